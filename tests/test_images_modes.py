"""Every PIL mode reaches the model as the RGB a person would see, checked against conversions
written here from the modes' definitions (numpy, not PIL): the tokenizer's output image,
de-normalised, is compared pixel by pixel (after mistral_common's own resize to whole patches,
applied to the expected image too, where the size is not a multiple of the patch size)."""
import colorsys
import io

import cv2

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import ImageChunk, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD
from PIL import Image

from pixtral_fast.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def seen_rgb(tok, img) -> np.ndarray:
    """The tokenizer's image back on the 0..255 scale, [H, W, 3] float."""
    enc = tok.encode([{"role": "user", "content": [{"type": "image", "image": img}]}])
    x = enc.images[0].transpose(1, 2, 0).astype(np.float64)
    return (x * np.array(DATASET_STD) + np.array(DATASET_MEAN)) * 255


def over_white(color, alpha):
    a = alpha[..., None] / 255.0
    return color * a + 255.0 * (1 - a)


def lab_to_srgb(lab8: np.ndarray) -> np.ndarray:
    """PIL's LAB bytes (L* * 255/100, then a* and b* as signed bytes; D50 white) to sRGB in
    0..255, by the CIE formulas, Bradford D50->D65 and the sRGB matrix and curve. NaN where out
    of gamut."""
    L = lab8[..., 0].astype(np.float64) * 100 / 255
    a, b = (lab8[..., 1:].astype(np.uint8).view(np.int8).astype(np.float64)).transpose(2, 0, 1)
    fy = (L + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], -1)
    d = 6 / 29
    xyz = np.where(f > d, f ** 3, 3 * d * d * (f - 4 / 29)) * np.array([0.9642, 1.0, 0.8249])
    bradford = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                         [0.0122982, -0.0204830, 1.3299098]])
    srgb = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                     [0.0556434, -0.2040259, 1.0572252]])
    lin = xyz @ (srgb @ bradford).T
    gamma = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.abs(lin) ** (1 / 2.4) - 0.055)
    out = gamma * 255
    out[((lin < 0) | (lin > 1)).any(-1)] = np.nan
    return out


def ycbcr_to_rgb(x):
    y, cb, cr = x[..., 0], x[..., 1] - 128.0, x[..., 2] - 128.0
    return np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1), 0, 255)


def hsv_to_rgb(x):
    flat = [colorsys.hsv_to_rgb(*(p / 255.0)) for p in x.reshape(-1, 3)]
    return np.array(flat).reshape(x.shape) * 255


def make(mode: str, h: int, w: int, rng: np.random.Generator, variant: int):
    """(PIL image, expected RGB [h, w, 3] float, tolerance in 8-bit levels)."""
    u8 = lambda c: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    gray = lambda v: np.repeat(np.asarray(v, np.float64)[..., None], 3, -1)  # noqa: E731
    if mode in ("RGB", "L", "CMYK", "LAB", "YCbCr", "HSV", "RGBX", "RGBA", "LA"):
        data = u8(len(mode) if mode not in ("YCbCr", "LAB", "HSV") else 3)
        if mode == "LAB":  # mostly inside the sRGB gamut: a*, b* within +-40 (signed bytes)
            data[..., 1:] = rng.integers(-40, 41, (h, w, 2)).astype(np.int8).view(np.uint8)
        img = Image.frombytes(mode, (w, h), data.tobytes())
        d = data.astype(np.float64)
        expected, tol = {  # evaluated for this mode only
            "RGB": (lambda: d, 0), "RGBX": (lambda: d[..., :3], 0), "L": (lambda: gray(d[..., 0]), 0),
            "RGBA": (lambda: over_white(d[..., :3], d[..., 3]), 1),
            "LA": (lambda: gray(over_white(d[..., :1], d[..., 1])[..., 0]), 1),
            "CMYK": (lambda: (255 - d[..., :3]) * (255 - d[..., 3:]) / 255, 1),
            "LAB": (lambda: lab_to_srgb(data), 1), "YCbCr": (lambda: ycbcr_to_rgb(d), 2),
            "HSV": (lambda: hsv_to_rgb(d), 2),
        }[mode]
        expected = expected()
        return img, expected, tol
    if mode == "1":
        bits = rng.integers(0, 2, (h, w)).astype(bool)
        return Image.fromarray(bits), gray(bits * 255.0), 0
    if mode in ("I;16", "I;16B"):
        v = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        raw = v.astype("<u2" if mode == "I;16" else ">u2").tobytes()
        return Image.frombytes(mode, (w, h), raw), gray(v / 257.0), 0.5
    if mode == "I":
        top = [255, 65535, 100000][variant % 3]   # 8-bit data widened, large values, out of range
        v = rng.integers(-1000 if top > 65535 else 0, top + 1, (h, w)).astype(np.int32)
        # in-memory mode I declares no 16-bit source: the 0..255 scale, clipped (whatever the range)
        return Image.frombytes("I", (w, h), v.tobytes()), gray(np.clip(v, 0, 255)), 0.5
    if mode == "F":
        unit = variant % 2 == 0
        v = (rng.random((h, w)) if unit else rng.uniform(-50, 400, (h, w))).astype(np.float32)
        expected = np.clip(v * 255.0, 0, 255)  # F is on the unit scale, whatever its range
        return Image.frombytes("F", (w, h), v.tobytes()), gray(expected), 0.5
    if mode in ("La", "RGBa"):  # premultiplied: a colour never exceeds its alpha
        c = 2 if mode == "La" else 4
        alpha = rng.integers(0, 256, (h, w, 1))
        color = (rng.random((h, w, c - 1)) * (alpha + 1)).astype(np.int64).clip(0, alpha)
        data = np.concatenate([color, alpha], -1).astype(np.uint8)
        expected = color + 255.0 - alpha  # composite of premultiplied colour over white
        return Image.frombytes(mode, (w, h), data.tobytes()), np.broadcast_to(expected, (h, w, 3)), 2
    if mode in ("P", "PA"):
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        index = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if mode == "PA":
            alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
            img = Image.frombytes("PA", (w, h), np.stack([index, alpha], -1).tobytes())
        else:
            alpha = np.where(index == index[0, 0], 0, 255)  # one palette entry transparent
            img = Image.frombytes("P", (w, h), index.tobytes())
            img.info["transparency"] = int(index[0, 0])
        img.putpalette(palette.tobytes())
        return img, over_white(palette[index].astype(np.float64), alpha.astype(np.float64)), 1
    raise AssertionError(mode)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "LAB",
         "I;16", "I;16B", "I", "F", "La", "RGBa"]


@settings(max_examples=80, deadline=None)
@given(mode=st.sampled_from(MODES), height=st.integers(1, 70), width=st.integers(1, 70),
       seed=st.integers(0, 2**32 - 1), variant=st.integers(0, 5))
def test_every_mode_against_its_definition(tok, mode, height, width, seed, variant):
    if mode == "LAB":  # out-of-gamut pixels (NaN here) would spread through the resize below
        height, width = 16 * -(-height // 16), 16 * -(-width // 16)
    img, expected, tol = make(mode, height, width, np.random.default_rng(seed), variant)
    got = seen_rgb(tok, img)
    size = (16 * -(-width // 16), 16 * -(-height // 16))
    if size != (width, height):
        # mistral_common's own resize to whole patches, applied to the independent conversion;
        # its cubic weights sum to at most ~1.3 in absolute value, and it sees 8-bit rounded input.
        expected = cv2.resize(expected.astype(np.float32), size, interpolation=cv2.INTER_CUBIC).astype(np.float64)
        tol = 1.3 * (tol + 0.5)
    assert got.shape == expected.shape
    valid = ~np.isnan(expected)
    assert valid.mean() > 0.2, "the generated colours should be mostly in gamut"
    err = np.where(valid, np.abs(got - expected), 0)
    assert err.max() <= tol + 0.01, (mode, err.max(), np.unravel_index(np.argmax(err), got.shape))


@pytest.mark.parametrize("mode, fill, rgb", [
    ("LAB", (0, 128, 128), (0, 0, 0)),             # black (was white before the fix)
    ("LAB", (255, 128, 128), (255, 255, 255)),
    ("I;16", 65535, (255, 255, 255)), ("I;16", 32896, (128, 128, 128)), ("I;16B", 257 * 40, (40, 40, 40)),
    ("I", 200, (200, 200, 200)), ("I", 255, (255, 255, 255)),
    ("I", 256, (255, 255, 255)),                   # was 1 (256 / 257): the range switched the scale
    ("I", 30000, (255, 255, 255)),                 # in memory, I declares 8-bit meaning: clipped
    ("F", 0.5, (128, 128, 128)), ("F", 1.0, (255, 255, 255)),
    ("F", 1.01, (255, 255, 255)), ("F", 100.0, (255, 255, 255)),  # unit scale, clipped (1.01 was 1)
    ("CMYK", (0, 0, 0, 255), (0, 0, 0)), ("RGBA", (9, 9, 9, 0), (255, 255, 255)), ("LA", (0, 0), (255, 255, 255)),
])
def test_solid_colours(tok, mode, fill, rgb):
    np.testing.assert_allclose(seen_rgb(tok, Image.new(mode, (32, 16), fill)), np.broadcast_to(rgb, (16, 32, 3)),
                               atol=1.01)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK"])
def test_modes_mistral_common_handles_are_untouched(tok, mode):
    """Within the size limit, these reach mistral_common as they are: its output bit for bit."""
    rng = np.random.default_rng(1)
    img, _, _ = make(mode, 40, 70, rng, 0) if mode != "P" else make("P", 40, 70, rng, 0)
    ours = tok.encode([{"role": "user", "content": [{"type": "image", "image": img}]}])
    theirs = tok.mistral.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=[ImageChunk(image=img)])]))
    assert ours.tokens == theirs.tokens
    np.testing.assert_array_equal(ours.images[0], theirs.images[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_image_refused(tok, bad):
    v = np.zeros((16, 16), np.float32)
    v[3, 4] = bad
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: the image holds non-finite pixels"):
        tok.encode([{"role": "user", "content": [{"type": "image", "image": Image.frombytes("F", (16, 16), v.tobytes())}]}])


def test_mode_I_from_a_16_bit_file_is_scaled_by_257(tok):
    """A 16-bit PGM opens as mode I (raw mode I;16B): its samples are 16-bit, 30000 -> 117."""
    data = b"P5\n32 16\n65535\n" + np.full((16, 32), 30000, ">u2").tobytes()
    img = Image.open(io.BytesIO(data))
    assert img.mode == "I"
    np.testing.assert_allclose(seen_rgb(tok, img), np.full((16, 32, 3), 117), atol=1.01)


@pytest.mark.parametrize("mode, values", [("I", range(250, 262)), ("F", np.linspace(0.9, 1.1, 11))])
def test_i_and_f_readings_are_monotone_in_the_pixel_value(tok, mode, values):
    """No jump where the image's range crosses 255 (I) or 1.0 (F)."""
    seen = [seen_rgb(tok, Image.new(mode, (16, 16), float(v) if mode == "F" else int(v)))[0, 0, 0] for v in values]
    assert all(b >= a - 1.01 for a, b in zip(seen, seen[1:])), seen
