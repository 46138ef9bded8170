"""images.load_image's refusals and warnings: a directory or a device is named as what it is (not
"no such image file"), a base64 payload without its data: prefix is cut short with a hint, and no
PIL DecompressionBombWarning is printed for images under our own pixel cap."""
import base64
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from pixtral_fast.images import load_image


def png_bytes(w=40, h=30):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def error(image) -> str:
    with pytest.raises(ValueError) as info:
        load_image(image, where="images[0]")
    return str(info.value)


def test_a_directory_is_named_as_one(tmp_path):
    assert error(tmp_path) == f"images[0]: {tmp_path} is a directory, not an image file"


def test_a_device_is_not_a_regular_file():
    assert error("/dev/zero") == "images[0]: /dev/zero is not a regular file (a device, pipe or socket)"


def test_base64_without_a_data_prefix_is_truncated_with_a_hint():
    payload = base64.b64encode(png_bytes()).decode()
    message = error(payload)
    assert len(message) < 250 and payload not in message, message
    assert payload[:40] in message and f"({len(payload)} characters)" in message
    assert "data URL" in message and "data:image/png;base64," in message
    load_image("data:image/png;base64," + payload)  # the same payload, prefixed, loads


def test_missing_file_still_says_so(tmp_path):
    assert error(tmp_path / "absent.png") == f"images[0]: no such image file: {tmp_path / 'absent.png'}"


def test_http_urls_are_not_fetched():
    assert "does not fetch URLs" in error("http://x/y.png")


@pytest.mark.parametrize("form", ["path", "bytes"])
def test_no_decompression_bomb_warning_under_our_cap(tmp_path, monkeypatch, form):
    """PIL warns past Image.MAX_IMAGE_PIXELS (89 MP by default); our cap (100 MP) is the limit
    that applies, so the warning is noise on stderr. Scaled down: PIL's limit 1000 px, 1200 px."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = png_bytes(40, 30)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = load_image(path if form == "path" else data)
    assert img.size == (40, 30)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.warns(Image.DecompressionBombWarning):  # the test's premise: PIL itself warns here
        Image.open(io.BytesIO(data))


def test_a_long_missing_path_is_echoed_whole(tmp_path):
    path = tmp_path / ("a-folder-whose-name-is-long_" * 4) / "absent.png"
    assert len(str(path)) > 120
    assert error(path) == f"images[0]: no such image file: {path}"
