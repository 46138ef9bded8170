"""Opening encoded images: only the raster formats in IMAGE_FORMATS, without PIL's bomb warning,
and errors that say what the bytes were rather than PIL's in-memory object."""
from __future__ import annotations

import functools
import threading
import warnings

from PIL import Image

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


def quiet_open(source) -> Image.Image:
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


def unreadable_bytes(data: bytes) -> str:
    """What the bytes were, for a client who sent something that is not an image: their size and
    first bytes, not PIL's message (which names an in-memory object)."""
    if not data:
        return "it is empty (0 bytes)"
    return (f"{', '.join(IMAGE_FORMATS)} expected; got {len(data)} bytes starting with "
            f"{data[:16]!r}")
