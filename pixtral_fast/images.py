"""Images as mistral_common can take them: opened with a pixel cap checked from the header,
shrunk in their own integer mode to the size mistral_common would shrink them to, and converted
to an 8-bit mode whose RGB conversion mistral_common gets right.

mistral_common converts every image to float32 at full size before it resizes (a 20000x20000
picture takes 8 GB there) and converts any mode through `convert("RGBA")`, which clips 16-bit
samples at 255 and reads float samples on the 0..255 scale. Resizing to mistral_common's own
target size first leaves its token count unchanged; its resizing and normalisation still run.

This is the one image decoder: the library (Tokenizer.encode) and the server read PIL images,
bytes, paths, base64 data: URLs and file:// URLs here under one MediaLimits; the server only adds
the http(s) fetch (serve/media.py) and its own limits (`MediaLimits.server`)."""
from __future__ import annotations

import base64
import binascii
import errno
import functools
import io
import re
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

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


NAME_MAX = 255      # bytes in one file name (Linux, macOS)
PATH_MAX = 4096     # bytes in a whole path (Linux)
LOCAL_HOSTS = ("", "localhost")  # a file:// URL names no host, or this machine
# urllib's urlsplit keeps its last 128 URLs in a cache: a client's URLs, data: URLs of megabytes
# among them, must not outlive their request
split_url = getattr(urlsplit, "__wrapped__", urlsplit)


@dataclass
class MediaLimits:
    """The bounds on a prompt's images, for the library and the server alike. The library's
    defaults: no byte or count cap, any local path. `server`: the images come from a client, so
    they are URLs only (data:, file://, and http(s) fetched beforehand), file:// URLs are read only
    under allowed_local_media_path, and errors name the server's options."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int | None = None          # an encoded image: data URL payload, file or download
    max_images_per_prompt: int | None = None
    allowed_local_media_path: Path | None = None
    fetch_timeout: float = 10.0
    server: bool = False

    def setting(self, name: str) -> str:
        """The option that sets the bound `name`, as the user sets it."""
        return f"--{name.replace('_', '-')}" if self.server else f"Tokenizer.{name}"


def shown(text: str, limit: int = 80) -> str:
    """A URL or path from the request in an error message: quoted, and cut, since it may be megabytes."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def open_image(image: Any, where: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               limits: MediaLimits | None = None) -> Image.Image:
    """A PIL image (pixels not necessarily decoded yet) from a PIL image, a path, a file:// URL, a
    base64 data URL or encoded bytes; ValueError if it is none of these, breaks `limits`, or has
    more than `limits.max_image_pixels` pixels (read from the header: nothing is decoded then).
    Without limits: the library's, with `max_pixels`."""
    limits = limits or MediaLimits(max_image_pixels=max_pixels)
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray)):
        img = _open_bytes(bytes(image), where, "the image bytes", limits)
    elif isinstance(image, (str, Path)):
        img = _open_str(image, where, limits)
    else:
        raise ValueError(f"{where}: expected a PIL image, a path, a data URL or image bytes, "
                         f"got {type(image).__name__}")
    _check_pixels(img, img is not image, where, limits)
    return img


def _check_pixels(img: Image.Image, owned: bool, where: str, limits: MediaLimits) -> None:
    pixels = img.width * img.height
    if img.width and img.height and pixels <= limits.max_image_pixels:
        return
    if owned:
        img.close()
    if pixels:
        raise ValueError(f"{where}: the image has {img.width}x{img.height} = {pixels} pixels; at most "
                         f"{limits.max_image_pixels} are allowed ({limits.setting('max_image_pixels')})")
    raise ValueError(f"{where}: the image has zero size ({img.width}x{img.height})")


def _open_str(image: str | Path, where: str, limits: MediaLimits) -> Image.Image:
    text = str(image)
    if text[:5].lower() == "data:":  # URL schemes are case-insensitive (RFC 3986): DATA: too
        return _open_bytes(data_url_bytes(text, where, limits), where, "the data URL", limits)
    if isinstance(image, str) and (limits.server or _URL_SCHEME.match(text) or text[:5].lower() == "file:"):
        return _open_url(text, where, limits)
    return _open_file(Path(image), where, limits, from_url=False)


def _open_url(url: str, where: str, limits: MediaLimits) -> Image.Image:
    parsed = parse_url(url, where)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return _open_file(file_url_path(parsed, where), where, limits, from_url=True)
    if not scheme:  # only a client's text gets here: the library reads it as a path
        raise ValueError(f"{where}: {url[:80]!r} is not a URL: give the image as a data:image/...;base64, URL, "
                         "an http(s):// URL or a file:// URL")
    if scheme in ("http", "https") and not limits.server:
        raise ValueError(f"{where}: {url[:80]!r} is an {scheme} URL; pixtral_fast does not fetch URLs "
                         "(download the image and pass a path, bytes or a data URL; the HTTP server "
                         "fetches URLs itself)")
    if scheme in ("http", "https"):
        raise ValueError(f"{where}: the {scheme} URL was not fetched before decoding")
    schemes = "data:, http(s)://, file://" if limits.server else "data:, file://"
    raise ValueError(f"{where}: unsupported image URL scheme {scheme!r} ({schemes})")


def parse_url(url: str, where: str) -> SplitResult:
    try:
        return split_url(url)
    except ValueError as e:  # an unclosed IPv6 bracket, say
        raise ValueError(f"{where}: {shown(url)} is not a valid URL ({e})") from None


def data_url_bytes(url: str, where: str, limits: MediaLimits) -> bytes:
    """The payload of a data:image/<type>;base64,<payload> URL, its size checked before decoding."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise ValueError(f"{where}: a data URL must look like data:image/<type>;base64,<payload> "
                         "(only base64 data URLs are supported)")
    cap = limits.max_image_bytes
    if cap is not None and len(payload) * 3 // 4 > cap:
        raise ValueError(f"{where}: the image is over {cap} bytes ({limits.setting('max_image_bytes')})")
    if not payload.strip():
        raise ValueError(f"{where}: the data URL's payload is empty (data:image/<type>;base64,<payload>)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the data URL's payload is not valid base64") from None


def file_url_path(parsed: SplitResult, where: str) -> Path:
    """The path of a file:// URL. A host other than this machine is refused, not dropped:
    file://images/x.png names the host 'images' (a relative path is not a file URL)."""
    if parsed.netloc.lower() not in LOCAL_HOSTS:
        raise ValueError(f"{where}: the file:// URL names the host {shown(parsed.netloc)}; only this machine's "
                         "files are read: file:///absolute/path or file://localhost/absolute/path")
    path = unquote(parsed.path, errors="surrogateescape")  # %ff: the file name's own byte, as os reads it
    if not path.startswith("/"):  # file:x.png would be read from the working folder
        raise ValueError(f"{where}: the file:// URL's path {shown(path)} is not absolute: write file:///absolute/path")
    if "\0" in path:
        raise ValueError(f"{where}: the file:// URL's path holds a NUL character")
    _check_path_length(path, where)
    return Path(path)


def _check_path_length(path: str, where: str) -> None:
    """The system's own limits, named, rather than its ENAMETOOLONG."""
    try:
        encoded = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: the file:// URL's path holds a lone surrogate (not valid UTF-8)") from None
    if len(encoded) > PATH_MAX:
        raise ValueError(f"{where}: the file path is {len(encoded)} bytes long; at most {PATH_MAX} are allowed "
                         "(PATH_MAX)")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise ValueError(f"{where}: a file name in the path is {len(longest)} bytes long; at most {NAME_MAX} are "
                         "allowed (NAME_MAX)")


def _open_file(path: Path, where: str, limits: MediaLimits, from_url: bool) -> Image.Image:
    """The image in a local file. A path from a URL is named quoted and cut (it is the client's
    text); a path the program gave is named as given."""
    name = shown(str(path)) if from_url else str(path)  # as the request wrote it, not resolved
    if limits.server:
        path = _allowed_local(path, where, limits)
    mode = _regular_file_mode(path, name, where)
    if mode is None or not stat.S_ISREG(mode):
        if from_url:
            raise ValueError(f"{where}: no such file: {name}" if mode is None
                             else f"{where}: {name} is not a regular file")
        raise ValueError(f"{where}: {_not_a_file(path, mode)}")
    if limits.max_image_bytes is None:
        return _open_path(path, where, limits)
    return _open_bytes(_read_capped_file(path, name, where, limits), where, "the file", limits)


def _allowed_local(path: Path, where: str, limits: MediaLimits) -> Path:
    """The resolved path, if it lies under the server's --allowed-local-media-path."""
    root = limits.allowed_local_media_path
    if root is None:
        raise ValueError(f"{where}: file:// URLs are refused: the server was started without "
                         "--allowed-local-media-path")
    try:
        resolved = path.resolve()
    except RuntimeError:  # Python < 3.13 reports a symlink loop so, later ones as OSError ELOOP
        raise ValueError(f"{where}: {shown(str(path))} is a symlink loop") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read {shown(str(path))}: {e.strerror or e}") from None
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"{where}: {shown(str(path))} is outside the allowed local media path")
    return resolved


def _regular_file_mode(path: Path, name: str, where: str) -> int | None:
    """path's st_mode, None where there is nothing (or a name the filesystem cannot take: a
    base64 payload without its data: prefix is longer than NAME_MAX)."""
    try:
        return path.stat().st_mode
    except RuntimeError:
        raise ValueError(f"{where}: {name} is a symlink loop") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{where}: {name} is a symlink loop") from None
        return None
    except ValueError:
        return None


def _read_capped_file(path: Path, name: str, where: str, limits: MediaLimits) -> bytes:
    cap = limits.max_image_bytes
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as e:  # unreadable, or gone since it was checked
        raise ValueError(f"{where}: cannot read {name}: {e.strerror or e}") from None
    if len(data) > cap:
        raise ValueError(f"{where}: the image is over {cap} bytes ({limits.setting('max_image_bytes')})")
    return data


_open_lock = threading.Lock()

# The raster formats an image is opened as (PIL format names). Image.open would otherwise try
# every plugin PIL has, among them EPS, which runs Ghostscript on the file's PostScript, and
# readers of scientific and legacy formats no client needs. mistral_common and vLLM accept
# anything PIL opens; the formats here are those phones, browsers and image libraries write,
# plus DDS and the Netpbm family (PPM/PGM/PBM, 16-bit too). JPEG covers MPO (a camera's JPEG with
# a second frame); AVIF is read where this Pillow has its plugin.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "AVIF", "BMP", "DIB", "TIFF", "PPM", "ICO", "TGA", "DDS")


class UnsupportedFormat(ValueError):
    """The bytes are an image PIL knows, in a format we do not open."""


def _quiet_open(source) -> Image.Image:
    """Image.open, of IMAGE_FORMATS only, without PIL's DecompressionBombWarning (printed to
    stderr for 89..179 MP): our own max_pixels cap is checked right after, from the same header.
    The lock: warning filters are process-wide, and catch_warnings must not interleave between
    tokenizing threads."""
    with _open_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(source, formats=_registered_formats())
        except Image.UnidentifiedImageError:
            other = _other_format(source)
            if other:
                raise UnsupportedFormat(f"the image is in the {other} format, which is not read "
                                        f"(supported: {', '.join(IMAGE_FORMATS)})") from None
            raise


@functools.cache
def _registered_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow has a plugin for (Image.open fails on a name it lacks)."""
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def _other_format(source) -> str | None:
    """The PIL format `source` is in, among the formats that are not opened, found by the plugins'
    own header checks (`_accept`): nothing of the file is parsed or run."""
    if hasattr(source, "seek"):
        source.seek(0)
        head = source.read(64)
    else:
        with open(source, "rb") as f:
            head = f.read(64)
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if name not in IMAGE_FORMATS and accept is not None and _accepts(accept, head):
            return name
    return None


def _accepts(accept, head: bytes) -> bool:
    try:
        return bool(accept(head))
    except Exception:  # a plugin's check on 64 foreign bytes: not ours to fail on
        return False


def _unreadable(data: bytes) -> str:
    """What the bytes were, for a client who sent something that is not an image: their size and
    first bytes, not PIL's message (which names an in-memory object)."""
    if not data:
        return "it is empty (0 bytes)"
    return (f"{', '.join(IMAGE_FORMATS)} expected; got {len(data)} bytes starting with "
            f"{data[:16]!r}")


def _not_a_file(path: Path, mode: int | None) -> str:
    """Why `path` cannot be read as an image file: a real path is echoed whole (up to 300
    characters), a base64 payload passed without its data: prefix only by its start and length."""
    text = str(path)
    base64_like = len(text) > 80 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", text) is not None
    shown_text = f"{text[:77]}... ({len(text)} characters)" if base64_like or len(text) > 300 else text
    if mode is not None:
        if stat.S_ISDIR(mode):
            return f"{shown_text} is a directory, not an image file"
        return f"{shown_text} is not a regular file (a device, pipe or socket)"
    if base64_like:
        return (f"no such image file: {shown_text}; it looks like base64 image data: pass it as a data URL, "
                f"'data:image/png;base64,<data>'")
    return f"no such image file: {shown_text}"


def _open_path(path: Path, where: str, limits: MediaLimits) -> Image.Image:
    try:
        return _quiet_open(path)
    except Image.DecompressionBombError as e:
        raise _bomb(where, e, limits) from None
    except UnsupportedFormat as e:
        raise ValueError(f"{where}: {path}: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, NotImplementedError (a DDS variant) ...
        raise ValueError(f"{where}: {path} is not a readable image ({type(e).__name__}: {e})") from None


def _open_bytes(data: bytes, where: str, what: str, limits: MediaLimits) -> Image.Image:
    try:
        return _quiet_open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _bomb(where, e, limits) from None
    except UnsupportedFormat as e:
        raise ValueError(f"{where}: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, NotImplementedError (a DDS variant) ...
        # the server's wording names PIL's finding alone; the library's names what held the bytes
        verb = "is not" if limits.server else "does not hold"
        # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" says nothing to a client
        why = _unreadable(data) if isinstance(e, Image.UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{where}: {what} {verb} a readable image ({why})") from None


def _bomb(where: str, e: Exception, limits: MediaLimits) -> ValueError:
    """PIL refuses, from the header, files past 2x its Image.MAX_IMAGE_PIXELS before we can look."""
    return ValueError(f"{where}: the image is too large ({e}); at most {limits.max_image_pixels} pixels are "
                      f"allowed ({limits.setting('max_image_pixels')}; PIL's Image.MAX_IMAGE_PIXELS also "
                      "applies to files)")


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


def load_image(image: Any, where: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_side: int | None = 1024, limits: MediaLimits | None = None) -> Image.Image:
    """open_image then prepare_image: what the tokenizer hands to mistral_common."""
    owned = not isinstance(image, Image.Image)
    return prepare_image(open_image(image, where, max_pixels, limits), max_side, where, owned)
