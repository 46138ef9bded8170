"""More hostile image input for the server's media layer and the library's decoder: hosts IDNA
refuses, a redirect with no Location, URL schemes in capitals, empty or unreadable payloads, and
formats that are not raster images (EPS would run Ghostscript) are each a clear 400 / ValueError,
never a 500 or PIL's repr of an in-memory file."""
import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from pixtral_fast import images
from pixtral_fast.serve.media import ImageSource, MediaLimits, fetch_remote, load_images, media_client
from pixtral_fast.serve.protocol import APIError
from tests.support.serve_server import picture, png_bytes

PARAM = "messages[0].content[0].image_url.url"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


def refusal(call) -> str:
    with pytest.raises(APIError) as caught:
        call()
    assert caught.value.status == 400 and caught.value.param == PARAM, caught.value.message
    return caught.value.message


def fetch(url: str, handler) -> ImageSource:
    source = ImageSource(url, PARAM)

    async def run():
        async with media_client(httpx.MockTransport(handler)) as client:
            await fetch_remote([source], MediaLimits(fetch_timeout=10), client)
    asyncio.run(run())
    return source


def never(request):
    raise AssertionError(f"fetched {request.url}")


def load(url: str) -> ImageSource:
    source = ImageSource(url, PARAM)
    load_images([source], MediaLimits())
    return source


def data_url_of(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("url", ["http://xn--/x.png", "http://xn--zz/x", "http://xn--ls8h.la/x"])
def test_a_host_idna_refuses_is_a_400_naming_the_url(url):
    assert f"{url!r} is not a valid URL" in refusal(lambda: fetch(url, never))


def test_a_redirect_to_a_host_idna_refuses_is_a_400_naming_the_redirect():
    def handle(request):
        return httpx.Response(302, headers={"Location": "http://xn--/x.png"})
    assert "redirected to 'http://xn--/x.png' is not a valid URL" in refusal(lambda: fetch("http://a.test/x", handle))


def test_a_redirect_with_an_empty_location_says_so():
    def handle(request):
        return httpx.Response(302, headers={"Location": ""})
    assert "empty Location header" in refusal(lambda: fetch("http://a.test/x", handle))


def test_a_data_url_scheme_in_capitals_is_a_data_url():
    image = png_bytes(picture(5, 3, 1))
    assert load("DATA:image/png;BASE64," + base64.b64encode(image).decode()).image.size == (5, 3)


def test_an_empty_data_url_payload_says_so():
    assert "the data URL's payload is empty" in refusal(lambda: load("data:image/png;base64,"))


def test_bytes_that_are_no_image_are_described_not_reprd():
    message = refusal(lambda: load(data_url_of(b"\x28\xb5\x2f\xfd not a picture")))
    assert "got 18 bytes starting with b'(\\xb5/\\xfd not a pictu')" in message and "PNG, JPEG" in message
    assert "BytesIO" not in message


def test_fetched_bytes_httpx_could_not_decode_are_described():
    """A Content-Encoding httpx has no decoder for (br without brotli, zstd ...) leaves the
    encoded bytes: the client is told what arrived."""
    def handle(request):
        return httpx.Response(200, headers={"Content-Encoding": "x-unknown"}, content=b"notzstd!!!")
    source = fetch("http://a.test/x.png", handle)
    message = refusal(lambda: load_images([source], MediaLimits()))
    assert "not a readable image" in message and "10 bytes starting with b'notzstd!!!'" in message
    assert "BytesIO" not in message


def test_an_eps_image_is_refused_by_name_without_running_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("the EPS plugin ran")
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", no_ghostscript)
    message = refusal(lambda: load(data_url_of(EPS, "eps")))
    assert "the image is in the EPS format, which is not read (supported: PNG, JPEG" in message
    with pytest.raises(ValueError, match="EPS format, which is not read"):
        images.open_image(EPS)


def test_an_eps_file_is_refused_by_name_too(tmp_path):
    path = tmp_path / "picture.eps"
    path.write_bytes(EPS)
    with pytest.raises(ValueError, match=r"picture.eps: the image is in the EPS format"):
        images.open_image(path)


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB"), ("BMP", "RGB"),
                                       ("TIFF", "RGB"), ("PPM", "RGB"), ("PPM", "L"), ("PPM", "1"), ("ICO", "RGBA"),
                                       ("TGA", "RGB"), ("DDS", "RGB"), ("MPO", "RGB")])
def test_every_listed_raster_format_still_loads(fmt, mode):
    encoded = io.BytesIO()
    Image.new(mode, (16, 16)).save(encoded, format=fmt)
    assert load(data_url_of(encoded.getvalue())).image.size == (16, 16)
