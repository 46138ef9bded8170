"""Decoded images as mistral_common can take them: shrunk in their own integer mode to the size
mistral_common would shrink them to, and converted to an 8-bit mode whose RGB conversion
mistral_common gets right (16-bit, I, F, LAB, premultiplied alpha)."""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageCms

# Modes that mistral_common's `convert("RGBA")` + composite-on-white turns into the right RGB.
_MISTRAL_SAFE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def mistral_target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size mistral_common's ImageEncoder scales an image to before it counts patches
    (mistral_common.tokens.tokenizers.image.ImageEncoder._image_to_num_tokens), same rounding."""
    ratio = max(height / max_side, width / max_side)
    if ratio <= 1:
        return width, height
    return max(round(width / ratio), 1), max(round(height / ratio), 1)


def prepare_image(img: Image.Image, max_side: int | None, where: str = "image", owned: bool = False) -> Image.Image:
    """The image shrunk (if it is larger) to mistral_common's target size for `max_side` (None:
    kept at its size), in an 8-bit mode mistral_common converts right. Pixels are decoded here,
    after the header checks. owned: the image was opened here (not the caller's object), so a
    JPEG may be decoded shrunk."""
    target = img.size if max_side is None else mistral_target_size(img.width, img.height, max_side)
    sixteen_bit = _sixteen_bit_source(img)  # read from the decoder before load() clears it
    try:
        if owned and target != img.size and img.format == "JPEG" and img.tile:
            img.draft(img.mode, target)  # decode at 1/2, 1/4 or 1/8 scale: never the full pixels
        img.load()
    except MemoryError:
        raise
    except Exception as e:
        raise ValueError(f"{where}: the image cannot be decoded ({type(e).__name__}: {e})") from None
    scale = _sample_scale(img, where, sixteen_bit)
    if target != img.size:
        img = _resizable(img).resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return _eight_bit(img, scale, where)


def _sample_scale(img: Image.Image, where: str, sixteen_bit_source: bool) -> float:
    """The divisor that brings an I or F image's samples to the 0..255 scale, decided by what the
    samples declare, never by their range (a range rule jumps: 255 stays 255 but 256 turns to 1):
    - I;16 modes, and mode I decoded from 16-bit samples (a 16-bit PNG or TIFF in a Pillow that
      opens it as I): 16-bit data, divided by 257 (65535 -> 255);
    - any other mode I (an 8-bit image widened, 32-bit TIFF samples, an in-memory int32 array):
      taken on the 0..255 scale, clipped;
    - F: floats on the unit scale, as float TIFFs and numpy/scikit-image images are: [0, 1] ->
      0..255, clipped (so 100.0 is white, like 1.0). Non-finite float pixels are refused.
    Read before resizing: bicubic overshoot must not change the reading."""
    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and sixteen_bit_source):
        return 257.0
    if img.mode == "F":
        if not np.isfinite(np.asarray(img)).all():
            raise ValueError(f"{where}: the image holds non-finite pixels (NaN or inf)")
        return 1 / 255
    return 1.0


def _sixteen_bit_source(img: Image.Image) -> bool:
    """A not yet decoded mode-I image whose file stores 16-bit samples (its decoder's raw mode
    says so; PNG's 16-bit grey reads as I;16B, TIFF's as I;16). Unknown once decoded: False."""
    if img.mode != "I":
        return False
    for tile in getattr(img, "tile", None) or ():
        args = tile.args if hasattr(tile, "args") else tile[3]
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and rawmode.startswith("I;16"):
            return True
    return False


def _resizable(img: Image.Image) -> Image.Image:
    """A mode PIL resizes with interpolation: palettes and bilevel resize with nearest only,
    16-bit modes lack kernels for some byte orders (I stays integer: no float copy)."""
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode in _SIXTEEN_BIT:
        return img.convert("I")
    return img


def _eight_bit(img: Image.Image, scale: float, where: str) -> Image.Image:
    """An image mistral_common converts right (at most max_side x max_side here: numpy is cheap)."""
    if img.mode in _MISTRAL_SAFE:
        return img
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        samples = np.asarray(img, dtype=np.float64) / scale
        return Image.fromarray(np.clip(np.rint(samples), 0, 255).astype(np.uint8))
    if img.mode == "LAB":
        return ImageCms.applyTransform(img, _lab_to_srgb())
    if img.mode in ("La", "RGBa"):  # premultiplied alpha
        return img.convert(img.mode.upper())
    try:
        return img.convert("RGBA")
    except (ValueError, OSError) as e:
        raise ValueError(f"{where}: image mode {img.mode!r} cannot be converted to RGB ({e})") from None


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    """PIL's LAB mode (D50 white) to sRGB through littleCMS. NOOPTIMIZE: the optimised 8-bit
    lookup tables are off by up to 19 levels near black; exact evaluation costs ~1 s per MP.
    NOCACHE: the one transform is shared by the threads that tokenize (lcms's cache is not)."""
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB",
                                   flags=ImageCms.Flags.NOOPTIMIZE | ImageCms.Flags.NOCACHE)
