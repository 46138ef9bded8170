"""Large images are shrunk before mistral_common converts them to float, to the size it would
shrink them to (same token count); inputs past the pixel cap are refused from their header; URLs
are not fetched; every way of giving an image agrees."""
import base64
import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import ImageChunk, ImageURLChunk, TextChunk, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers import image as mistral_image
from PIL import Image

from pixtral_fast.config import IMG_ID
from pixtral_fast.images import DEFAULT_MAX_IMAGE_PIXELS, mistral_target_size
from pixtral_fast.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def user_image(image, kind="image"):
    part = {"type": "image", "image": image} if kind == "image" else {"type": "image_url", "image_url": {"url": image}}
    return [{"role": "user", "content": [part, {"type": "text", "text": "what is it?"}]}]


def raw_mistral(tok, img):
    """mistral_common on its own, for comparison."""
    return tok.mistral.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(
        content=[ImageChunk(image=img), TextChunk(text="what is it?")])]))


def gradient(width, height):
    """A smooth picture (one antialiased shrink then mistral_common's resize, and its resize
    alone, agree closely on it), made by PIL so that big ones are cheap."""
    ramp, size = Image.linear_gradient("L"), (width, height)
    return Image.merge("RGB", [ramp.resize(size), ramp.transpose(Image.Transpose.ROTATE_90).resize(size),
                               Image.radial_gradient("L").resize(size)])


def png_header_only(width, height):
    """A PNG whose header says width x height and whose pixel data is missing: opening it reads the
    header; decoding it would fail. An error about the size proves nothing was decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\x9c") + chunk(b"IEND", b"")


class _Sized:
    def __init__(self, w, h):
        self.size = (w, h)


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 100_000), h=st.integers(1, 100_000))
def test_shrinking_first_keeps_the_token_grid(tok, w, h):
    encoder = tok.mistral.instruct_tokenizer.image_encoder
    tw, th = mistral_target_size(w, h, 1024)
    assert max(tw, th) <= 1024 and min(tw, th) >= 1
    if max(w, h) <= 1024:
        assert (tw, th) == (w, h)
    assert encoder._image_to_num_tokens(_Sized(tw, th)) == encoder._image_to_num_tokens(_Sized(w, h))


@pytest.mark.parametrize("width, height", [(2500, 700), (1025, 1025), (700, 3001), (4000, 9)])
def test_large_images_same_tokens_close_pixels(tok, width, height):
    img = gradient(width, height)
    ours, theirs = tok.encode(user_image(img)), raw_mistral(tok, img)
    assert ours.tokens == theirs.tokens
    assert ours.images[0].shape == theirs.images[0].shape
    # Not equal (one antialiased shrink + mistral_common's resize vs its resize alone), but the
    # same picture: within 2% of the normalised range on average. (At 4000x9 -> 1024x2, cv2's
    # unfiltered cubic samples 2 of the 9 rows: the two legitimately differ there.)
    if min(width, height) >= 100:
        assert np.abs(ours.images[0] - theirs.images[0]).mean() < 0.08


def test_no_float_copy_of_the_full_image(tok, monkeypatch):
    """A 6000x4000 RGB picture: mistral_common alone allocates 6000*4000*3*4 = 288 MB of float32;
    here numpy sees only the shrunk 1024x683 image."""
    seen = []
    original = mistral_image.transform_image
    monkeypatch.setattr(mistral_image, "transform_image", lambda image, size: seen.append(image.size) or original(image, size))
    img = gradient(6000, 4000)
    tracemalloc.start()
    try:
        enc = tok.encode(user_image(img))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == [(1024, 683)] and enc.images[0].shape == (3, 688, 1024)
    assert peak < 40e6, f"{peak / 1e6:.0f} MB traced during encode"


def test_large_jpeg_decoded_shrunk(tok, tmp_path):
    path = tmp_path / "big.jpg"
    gradient(3000, 2000).save(path, quality=95)
    ours = tok.encode(user_image(str(path)))
    with Image.open(path) as img:
        theirs = raw_mistral(tok, img)
    assert ours.tokens == theirs.tokens
    assert np.abs(ours.images[0] - theirs.images[0]).mean() < 0.08


def test_pixel_cap(tok, monkeypatch):
    assert tok.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 100_000_000
    small = tok
    monkeypatch.setattr(small, "max_image_pixels", 40 * 40)
    small.encode(user_image(gradient(40, 40)))
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: the image has 41x40 = 1640 pixels; at most "
                                         r"1600 are allowed \(Tokenizer.max_image_pixels\)"):
        small.encode(user_image(gradient(41, 40)))
    for bad in (0, -1, 2.5, True, "9"):
        with pytest.raises(ValueError, match="max_image_pixels must be a positive int"):
            small.max_image_pixels = bad


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("form", ["path", "bytes", "data_url"])
def test_pixel_cap_read_from_the_header(tok, tmp_path, form):
    data = png_header_only(12_000, 9_000)  # 108 MP: past the default cap, under PIL's own limit
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    image = {"path": str(path), "bytes": data, "data_url": "data:image/png;base64," + base64.b64encode(data).decode()}[form]
    with pytest.raises(ValueError, match=r"12000x9000 = 108000000 pixels; at most 100000000"):
        tok.encode(user_image(image))
    # Past PIL's own decompression-bomb limit, which PIL applies while reading the header.
    path.write_bytes(png_header_only(20_000, 20_000))
    with pytest.raises(ValueError, match=r"the image is too large \(.*400000000 pixels.*\); at most 100000000"):
        tok.encode(user_image(str(path)))


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png", "HTTPS://x/y.jpg"])
def test_urls_are_not_fetched(tok, url, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to fetch")
    monkeypatch.setattr(mistral_image, "download_image", no_network)
    message = r"messages\[0\].content\[0\]: .* URL; pixtral_fast does not fetch URLs .*the HTTP server fetches"
    for request in (user_image(url), user_image(url, "image_url"),
                    [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}],
                    ChatCompletionRequest(messages=[UserMessage(content=[ImageURLChunk(image_url=url)])])):
        with pytest.raises(ValueError, match=message) as info:
            tok.encode(request)
        assert type(info.value) is ValueError


def test_other_schemes_and_file_urls(tok, tmp_path):
    with pytest.raises(ValueError, match=r"unsupported image URL scheme 'ftp' \(data:, file://\)"):
        tok.encode(user_image("ftp://host/cat.png"))
    img = gradient(40, 30)
    path = tmp_path / "a b.png"
    img.save(path)
    by_file_url = tok.encode(user_image("file://" + str(path).replace(" ", "%20"), "image_url"))
    by_pil = tok.encode(user_image(img))
    assert by_file_url.tokens == by_pil.tokens
    np.testing.assert_array_equal(by_file_url.images[0], by_pil.images[0])


def test_file_urls_name_no_other_host_and_an_absolute_path(tok, tmp_path):
    img = gradient(40, 30)
    path = tmp_path / "x.png"
    img.save(path)
    by_localhost = tok.encode(user_image("file://localhost" + str(path), "image_url"))
    assert by_localhost.tokens == tok.encode(user_image(img)).tokens
    # file://relative/x.png names the host 'relative': reading /x.png instead would be silently wrong
    with pytest.raises(ValueError, match=r"names the host 'relative'"):
        tok.encode(user_image("file://relative" + str(path), "image_url"))


def test_bytes_and_chunks_agree(tok):
    img = gradient(70, 40)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    forms = [user_image(img), user_image(buf.getvalue()), user_image(bytearray(buf.getvalue())),
             ChatCompletionRequest(messages=[UserMessage(content=[ImageChunk(image=img), TextChunk(text="what is it?")])]),
             [UserMessage(content=[ImageChunk(image=img), TextChunk(text="what is it?")])]]
    encs = [tok.encode(f) for f in forms]
    for e in encs[1:]:
        assert e.tokens == encs[0].tokens
        np.testing.assert_array_equal(e.images[0], encs[0].images[0])
    assert encs[0].tokens.count(IMG_ID) == 3 * 5


def test_large_image_in_a_chat_completion_request_is_shrunk(tok, monkeypatch):
    seen = []
    original = mistral_image.transform_image
    monkeypatch.setattr(mistral_image, "transform_image", lambda image, size: seen.append(image.size) or original(image, size))
    tok.encode(ChatCompletionRequest(messages=[UserMessage(content=[ImageChunk(image=gradient(3000, 1500))])]))
    assert seen == [(1024, 512)]


@pytest.mark.parametrize("payload, message", [
    ("data:image/png;base64,!!!", "payload is not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "the data URL does not hold a readable image"),
    ("data:image/png,abc", "only base64 data URLs are supported"),
])
def test_bad_data_urls(tok, payload, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(user_image(payload))


def test_truncated_file_named(tok, tmp_path):
    buf = io.BytesIO()
    gradient(64, 64).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:200])
    with pytest.raises(ValueError, match=r"content\[0\]: the image cannot be decoded"):
        tok.encode(user_image(path))
