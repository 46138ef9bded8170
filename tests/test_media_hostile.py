"""The server's media layer (serve/media.py) against hostile image URLs: every bad file:// or
http(s) URL, and every bad redirect, is a 400 naming the image's param and the problem, never
an OSError, RuntimeError or ValueError that the server would answer with a 500."""
import asyncio
import base64
import gc
import io
import os
import struct
import sys
from pathlib import Path

import httpx
import pytest

from pixtral_fast.serve.media import (MAX_REDIRECTS, ImageSource, MediaLimits, fetch_remote, load_images,
                                      media_client)
from pixtral_fast.serve.protocol import APIError
from tests.support.serve_server import data_url, picture, png_bytes

PARAM = "messages[0].content[0].image_url.url"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    picture(8, 8, 0).save(folder / "ok.png")
    (folder / "loop_a").symlink_to(folder / "loop_b")
    (folder / "loop_b").symlink_to(folder / "loop_a")
    (folder / "sub").mkdir()
    return folder


def load(url: str, media_dir) -> ImageSource:
    source = ImageSource(url, PARAM)
    load_images([source], MediaLimits(allowed_local_media_path=media_dir))
    return source


def refusal(call) -> APIError:
    with pytest.raises(APIError) as caught:
        call()
    assert caught.value.status == 400 and caught.value.param == PARAM, caught.value.message
    return caught.value


def test_a_good_file_url_loads_with_or_without_localhost(media_dir):
    assert load(f"file://{media_dir}/ok.png", media_dir).image.size == (8, 8)
    assert load(f"file://localhost{media_dir}/ok.png", media_dir).image.size == (8, 8)


def bad_file_urls(media_dir):
    return {
        "symlink loop": (f"file://{media_dir}/loop_a", "is a symlink loop"),
        "file name over NAME_MAX": (f"file://{media_dir}/{'n' * 256}.png", "at most 255 are allowed (NAME_MAX)"),
        "path over PATH_MAX": (f"file://{media_dir}/" + "/".join(["d" * 250] * 17), "at most 4096 are allowed (PATH_MAX)"),
        "host part": ("file://relative/ok.png", "names the host 'relative'"),
        "remote host": (f"file://example.com{media_dir}/ok.png", "names the host 'example.com'"),
        "NUL in the path": (f"file://{media_dir}/ok%00.png", "NUL character"),
        "a folder": (f"file://{media_dir}/sub", "is not a regular file"),
        "missing file": (f"file://{media_dir}/missing.png", "no such file"),
        "unclosed IPv6 bracket": ("file://[::1/x.png", "is not a valid URL"),
        "lone surrogate": (f"file://{media_dir}/\ud800.png", "lone surrogate"),
        "no path": ("file:", "is not absolute"),
    }


@pytest.mark.parametrize("case", bad_file_urls("/m").keys())
def test_a_bad_file_url_is_a_400_naming_the_problem(media_dir, case):
    url, phrase = bad_file_urls(media_dir)[case]
    assert phrase in refusal(lambda: load(url, media_dir)).message


def test_a_relative_file_url_is_refused_not_read_from_the_working_folder(media_dir, monkeypatch):
    monkeypatch.chdir(media_dir)
    assert "'ok.png' is not absolute" in refusal(lambda: load("file:ok.png", media_dir)).message


def test_a_percent_escaped_byte_names_that_byte_of_the_file_name(media_dir):
    """%FF is the file name's byte 0xff (not U+FFFD): a file named so on disk is found."""
    (Path(os.fsdecode(bytes(media_dir) + b"/\xff.png"))).write_bytes((media_dir / "ok.png").read_bytes())
    assert load(f"file://{media_dir}/%FF.png", media_dir).image.size == (8, 8)


def test_a_file_name_of_exactly_name_max_bytes_is_only_missing(media_dir):
    """The bound is the system's: 255 bytes pass the check (and the file is simply absent)."""
    assert os.pathconf(media_dir, "PC_NAME_MAX") == 255
    assert "no such file" in refusal(lambda: load(f"file://{media_dir}/{'n' * 251}.png", media_dir)).message


def test_a_file_the_system_cannot_read_is_a_400():
    """/proc/self/mem is a regular file that read() refuses (EIO): as any unreadable file."""
    message = refusal(lambda: load("file:///proc/self/mem", Path("/proc"))).message
    assert "cannot read '/proc/self/mem'" in message and "Input/output error" in message


def test_an_image_in_a_format_variant_pil_cannot_decode_is_a_400():
    """PIL raises NotImplementedError for a DDS whose pixel format flags it does not know."""
    encoded = io.BytesIO()
    picture(4, 4, 3).save(encoded, format="DDS")
    dds = bytearray(encoded.getvalue())
    struct.pack_into("<I", dds, 80, 139)  # the pixel format's flags (header offset 76 + 4)
    source = ImageSource("data:image/dds;base64," + base64.b64encode(bytes(dds)).decode(), PARAM)
    message = refusal(lambda: load_images([source], MediaLimits())).message
    assert "not a readable image (NotImplementedError" in message


def take_and_drop(url: str) -> None:
    source = ImageSource(url, PARAM)
    try:
        asyncio.run(fetch_remote([source], MediaLimits(), media_client()))
        load_images([source], MediaLimits())
    except APIError:
        pass


def test_no_image_url_outlives_its_request():
    """urllib's urlsplit caches its last 128 URLs (Python 3.11): 128 data: URLs of 20 MB would stay
    in memory. Nothing in the media path may keep a reference to a client's URL."""
    urls = [data_url(picture(6, 6, 4)), "".join(["http://127.0.0.1:99999/", "x.png"]),
            "".join(["file:///nowhere/", "x.png"])]
    before = [sys.getrefcount(u) for u in urls]
    for i in range(len(urls)):
        take_and_drop(urls[i])
    gc.collect()  # an error's traceback holds its frames (and their URLs) in a cycle until then
    assert [sys.getrefcount(u) for u in urls] == before


def fetch(url: str, handler=None, client: httpx.AsyncClient | None = None) -> ImageSource:
    source = ImageSource(url, PARAM)

    async def run():
        async with client or media_client(httpx.MockTransport(handler or (lambda r: httpx.Response(404)))) as c:
            await fetch_remote([source], MediaLimits(fetch_timeout=10), c)
    asyncio.run(run())
    return source


BAD_HTTP_URLS = {
    "unclosed IPv6 bracket": ("http://[::1", "is not a valid URL (Invalid IPv6 URL)"),
    "port out of range": ("http://127.0.0.1:99999/x.png", "is not a valid URL (Port out of range"),
    "port not a number": ("http://127.0.0.1:x/x.png", "is not a valid URL"),
    "no host": ("http:///x.png", "names no host"),
}


@pytest.mark.parametrize("case", BAD_HTTP_URLS.keys())
def test_a_malformed_http_url_is_a_400_before_any_fetch(case):
    url, phrase = BAD_HTTP_URLS[case]

    def never(request):
        raise AssertionError(f"fetched {request.url}")
    assert phrase in refusal(lambda: fetch(url, never)).message


def redirecting(location: str, image: bytes = b""):
    """A web server whose /start redirects to `location` and whose /image.png is `image`."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/start":
            return httpx.Response(302, headers={"Location": location})
        return httpx.Response(200, content=image) if request.url.path == "/image.png" else httpx.Response(404)
    return handle


BAD_REDIRECTS = {
    "data:": ("data:image/png;base64,iVBORw0KGgo=", "redirected to 'data:image/png;base64,iVBORw0KGgo='"),
    "file:": ("file:///etc/passwd", "redirected to 'file:"),
    "ftp:": ("ftp://example.com/x.png", "redirected to 'ftp://example.com/x.png': only redirects to http(s)"),
    "malformed": ("http://[::1", "redirected to 'http://[::1'"),
}


@pytest.mark.parametrize("case", BAD_REDIRECTS.keys())
def test_a_redirect_to_anything_but_http_is_a_400_naming_the_redirect(case):
    location, phrase = BAD_REDIRECTS[case]
    assert phrase in refusal(lambda: fetch("http://images.test/start", redirecting(location))).message


def test_a_plain_httpx_client_refuses_a_data_redirect_with_a_400_too():
    """Without media_client's hook httpx itself raises InvalidURL: still a 400, not a 500."""
    client = httpx.AsyncClient(transport=httpx.MockTransport(redirecting("data:image/png;base64,AAAA")))
    assert "could not fetch the image" in refusal(lambda: fetch("http://images.test/start", client=client)).message


def test_an_http_redirect_is_followed_relative_or_absolute():
    image = png_bytes(picture(4, 4, 1))
    assert fetch("http://images.test/start", redirecting("/image.png", image)).data == image
    assert fetch("http://images.test/start", redirecting("http://images.test/image.png", image)).data == image


def test_redirects_past_the_limit_are_a_400():
    def hops(request: httpx.Request) -> httpx.Response:
        n = int(request.url.path.strip("/") or 0)
        return httpx.Response(302, headers={"Location": f"/{n + 1}"}) if n <= MAX_REDIRECTS else \
            httpx.Response(200, content=png_bytes(picture(4, 4, 2)))
    assert fetch("http://images.test/1", hops).data  # 1 -> ... -> MAX_REDIRECTS + 1: that many redirects
    assert f"more than {MAX_REDIRECTS} times" in refusal(lambda: fetch("http://images.test/0", hops)).message
