"""The one image decoder: the library (Tokenizer.encode) and the server read PIL images, bytes,
paths, base64 data: URLs and file:// URLs here under one MediaLimits; the server only adds the
http(s) fetch (serve/media.py) and its own limits (`MediaLimits.server`).

Where the bytes come from is checked in image_sources.py, the format in image_formats.py; the
pixel cap is read from the header before any pixel is decoded, then image_convert.py shrinks and
converts. mistral_common converts every image to float32 at full size before it resizes (a
20000x20000 picture takes 8 GB there) and reads 16-bit and float samples wrongly; resizing to its
own target size first leaves its token count unchanged."""
from __future__ import annotations

import io
import stat
from pathlib import Path
from typing import Any

from PIL import Image

from pixtral_fast.image_convert import mistral_target_size, prepare_image
from pixtral_fast.image_formats import IMAGE_FORMATS, UnsupportedFormat, quiet_open, unreadable_bytes
from pixtral_fast.image_sources import (DEFAULT_MAX_IMAGE_PIXELS, URL_SCHEME, MediaLimits, allowed_local,
                                        data_url_bytes, file_url_path, not_a_file, parse_url, read_capped_file,
                                        regular_file_mode, shown, split_url)

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_FORMATS", "MediaLimits", "data_url_bytes", "file_url_path",
           "load_image", "mistral_target_size", "open_image", "parse_url", "prepare_image", "shown", "split_url"]


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
    if isinstance(image, str) and (limits.server or URL_SCHEME.match(text) or text[:5].lower() == "file:"):
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


def _open_file(path: Path, where: str, limits: MediaLimits, from_url: bool) -> Image.Image:
    """The image in a local file. A path from a URL is named quoted and cut (it is the client's
    text); a path the program gave is named as given."""
    name = shown(str(path)) if from_url else str(path)  # as the request wrote it, not resolved
    if limits.server:
        path = allowed_local(path, where, limits)
    mode = regular_file_mode(path, name, where)
    if mode is None or not stat.S_ISREG(mode):
        if from_url:
            raise ValueError(f"{where}: no such file: {name}" if mode is None
                             else f"{where}: {name} is not a regular file")
        raise ValueError(f"{where}: {not_a_file(path, mode)}")
    if limits.max_image_bytes is None:
        return _open_path(path, where, limits)
    return _open_bytes(read_capped_file(path, name, where, limits), where, "the file", limits)


def _open_path(path: Path, where: str, limits: MediaLimits) -> Image.Image:
    return _opened(path, where, limits, f"{path}: ",
                   lambda e: f"{path} is not a readable image ({type(e).__name__}: {e})")


def _open_bytes(data: bytes, where: str, what: str, limits: MediaLimits) -> Image.Image:
    # the server's wording names PIL's finding alone; the library's names what held the bytes
    verb = "is not" if limits.server else "does not hold"

    def unreadable(e: Exception) -> str:
        # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" says nothing to a client
        why = unreadable_bytes(data) if isinstance(e, Image.UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        return f"{what} {verb} a readable image ({why})"
    return _opened(io.BytesIO(data), where, limits, "", unreadable)


def _opened(source, where: str, limits: MediaLimits, named: str, unreadable) -> Image.Image:
    """quiet_open(source), each refusal a ValueError: `named` prefixes a format refusal, and
    `unreadable(e)` says why PIL could not read it."""
    try:
        return quiet_open(source)
    except Image.DecompressionBombError as e:
        raise _bomb(where, e, limits) from None
    except UnsupportedFormat as e:
        raise ValueError(f"{where}: {named}{e}") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, NotImplementedError (a DDS variant) ...
        raise ValueError(f"{where}: {unreadable(e)}") from None


def _bomb(where: str, e: Exception, limits: MediaLimits) -> ValueError:
    """PIL refuses, from the header, files past 2x its Image.MAX_IMAGE_PIXELS before we can look."""
    return ValueError(f"{where}: the image is too large ({e}); at most {limits.max_image_pixels} pixels are "
                      f"allowed ({limits.setting('max_image_pixels')}; PIL's Image.MAX_IMAGE_PIXELS also "
                      "applies to files)")


def load_image(image: Any, where: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_side: int | None = 1024, limits: MediaLimits | None = None) -> Image.Image:
    """open_image then prepare_image: what the tokenizer hands to mistral_common."""
    owned = not isinstance(image, Image.Image)
    return prepare_image(open_image(image, where, max_pixels, limits), max_side, where, owned)
