"""Image payloads the server's media layer and the library's decoder read: bytes that are no image,
or that httpx could not decode, are described (never PIL's repr of an in-memory file); formats that
are not raster images (EPS would run Ghostscript) are refused by name; every listed raster format
loads."""
import io

import httpx
import pytest
from PIL import Image

from pixtral_fast import images
from pixtral_fast.serve.media import MediaLimits, load_images
from tests.test_media_urls import data_url_of, fetch, load, refusal

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


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
