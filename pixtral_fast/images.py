"""Images as mistral_common can take them: opened with a pixel cap checked from the header,
shrunk in their own integer mode to the size mistral_common would shrink them to, and converted
to an 8-bit mode whose RGB conversion mistral_common gets right.

mistral_common converts every image to float32 at full size before it resizes (a 20000x20000
picture takes 8 GB there) and converts any mode through `convert("RGBA")`, which clips 16-bit
samples at 255 and reads float samples on the 0..255 scale. Resizing to mistral_common's own
target size first leaves its token count unchanged; its resizing and normalisation still run."""
from __future__ import annotations

import base64
import binascii
import functools
import io
import re
import stat
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageCms

# 100 megapixels: above the default output of every mainstream camera and phone (<= 50 MP), and
# since the model sees at most 1024x1024 px, larger inputs only cost memory and time. One image at
# the cap decodes to ~400 MB (RGBA) before it is shrunk. Raise Tokenizer.max_image_pixels for
# more (files past 2x PIL's Image.MAX_IMAGE_PIXELS, ~179 MP, are also refused by PIL's own check).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

# Modes that mistral_common's `convert("RGBA")` + composite-on-white turns into the right RGB.
_MISTRAL_SAFE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def mistral_target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size mistral_common's ImageEncoder scales an image to before it counts patches
    (mistral_common.tokens.tokenizers.image.ImageEncoder._image_to_num_tokens), same rounding."""
    ratio = max(height / max_side, width / max_side)
    if ratio <= 1:
        return width, height
    return max(round(width / ratio), 1), max(round(height / ratio), 1)


def open_image(image: Any, where: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A PIL image (pixels not necessarily decoded yet) from a PIL image, a path, a file:// URL, a
    base64 data URL or encoded bytes; ValueError if it is none of these, or has more than
    `max_pixels` pixels (read from the header: nothing is decoded then)."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray)):
        img = _open_bytes(bytes(image), where, "the image bytes", max_pixels)
    elif isinstance(image, (str, Path)):
        img = _open_str(image, where, max_pixels)
    else:
        raise ValueError(f"{where}: expected a PIL image, a path, a data URL or image bytes, "
                         f"got {type(image).__name__}")
    pixels = img.width * img.height
    if img.width == 0 or img.height == 0 or pixels > max_pixels:
        if img is not image:
            img.close()
        if pixels:
            raise ValueError(f"{where}: the image has {img.width}x{img.height} = {pixels} pixels; at most "
                             f"{max_pixels} are allowed (Tokenizer.max_image_pixels)")
        raise ValueError(f"{where}: image has zero size ({img.width}x{img.height})")
    return img


def _open_str(image: str | Path, where: str, max_pixels: int) -> Image.Image:
    text = str(image)
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if ";base64" not in header:
            raise ValueError(f"{where}: only base64 data URLs are supported")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: the data URL's payload is not valid base64") from None
        return _open_bytes(data, where, "the data URL", max_pixels)
    if isinstance(image, str) and _URL_SCHEME.match(text):
        parsed = urlparse(text)
        scheme = parsed.scheme.lower()
        if scheme in ("http", "https"):
            raise ValueError(f"{where}: {text[:80]!r} is an {scheme} URL; pixtral_fast does not fetch URLs "
                             "(download the image and pass a path, bytes or a data URL; the HTTP server "
                             "fetches URLs itself)")
        if scheme != "file":
            raise ValueError(f"{where}: unsupported image URL scheme {scheme!r} (data:, file://)")
        image = _file_url_path(parsed, where)
    path = Path(image)
    mode = _stat_mode(path)
    if mode is None or not stat.S_ISREG(mode):
        raise ValueError(f"{where}: {_not_a_file(path, mode)}")
    try:
        return _quiet_open(path)
    except Image.DecompressionBombError as e:
        raise _bomb(where, e, max_pixels) from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ...
        raise ValueError(f"{where}: {path} is not a readable image ({type(e).__name__}: {e})") from None


def _file_url_path(parsed, where: str) -> Path:
    """The path of a file:// URL. A host other than this machine is refused, not dropped:
    file://images/x.png names the host 'images' (a relative path is not a file URL)."""
    if parsed.netloc.lower() not in ("", "localhost"):
        raise ValueError(f"{where}: the file:// URL names the host {parsed.netloc[:80]!r}; only this machine's "
                         "files are read: file:///absolute/path or file://localhost/absolute/path")
    if not parsed.path.startswith("/"):
        raise ValueError(f"{where}: the file:// URL's path {parsed.path[:80]!r} is not absolute: "
                         "write file:///absolute/path")
    return Path(unquote(parsed.path))


_open_lock = threading.Lock()


def _quiet_open(source) -> Image.Image:
    """Image.open without PIL's DecompressionBombWarning (printed to stderr for 89..179 MP): our
    own max_pixels cap is checked right after, from the same header. The lock: warning filters
    are process-wide, and catch_warnings must not interleave between tokenizing threads."""
    with _open_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def _stat_mode(path: Path) -> int | None:
    """path's st_mode, None where there is nothing (or a name the filesystem cannot take: a
    base64 payload without its data: prefix is longer than NAME_MAX)."""
    try:
        return path.stat().st_mode
    except (OSError, ValueError):
        return None


def _not_a_file(path: Path, mode: int | None) -> str:
    """Why `path` cannot be read as an image file: a real path is echoed whole (up to 300
    characters), a base64 payload passed without its data: prefix only by its start and length."""
    text = str(path)
    base64_like = len(text) > 80 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", text) is not None
    shown = f"{text[:77]}... ({len(text)} characters)" if base64_like or len(text) > 300 else text
    if mode is not None:
        if stat.S_ISDIR(mode):
            return f"{shown} is a directory, not an image file"
        return f"{shown} is not a regular file (a device, pipe or socket)"
    if base64_like:
        return (f"no such image file: {shown}; it looks like base64 image data: pass it as a data URL, "
                f"'data:image/png;base64,<data>'")
    return f"no such image file: {shown}"


def _open_bytes(data: bytes, where: str, what: str, max_pixels: int) -> Image.Image:
    try:
        return _quiet_open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _bomb(where, e, max_pixels) from None
    except MemoryError:
        raise
    except Exception as e:
        raise ValueError(f"{where}: {what} does not hold a readable image ({type(e).__name__}: {e})") from None


def _bomb(where: str, e: Exception, max_pixels: int) -> ValueError:
    """PIL refuses, from the header, files past 2x its Image.MAX_IMAGE_PIXELS before we can look."""
    return ValueError(f"{where}: the image is too large ({e}); at most {max_pixels} pixels are allowed "
                      "(Tokenizer.max_image_pixels; PIL's Image.MAX_IMAGE_PIXELS also applies to files)")


def prepare_image(img: Image.Image, max_side: int, where: str = "image", owned: bool = False) -> Image.Image:
    """The image shrunk (if it is larger) to mistral_common's target size for `max_side`, in an
    8-bit mode mistral_common converts right. Pixels are decoded here, after the header checks.
    owned: the image was opened here (not the caller's object), so a JPEG may be decoded shrunk."""
    target = mistral_target_size(img.width, img.height, max_side)
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


def load_image(image: Any, where: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_side: int = 1024) -> Image.Image:
    """open_image then prepare_image: what the tokenizer hands to mistral_common."""
    owned = not isinstance(image, Image.Image)
    return prepare_image(open_image(image, where, max_pixels), max_side, where, owned)
