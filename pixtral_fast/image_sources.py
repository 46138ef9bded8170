"""Where an image's bytes come from, checked before anything is decoded: the bounds on a prompt's
images (MediaLimits, for the library and the server alike), base64 data: URLs, file:// URLs and
local files (host, absolute path, NAME_MAX/PATH_MAX, symlink loops, the server's allowed folder,
the byte cap). URLs from a client are split without urllib's cache."""
from __future__ import annotations

import base64
import binascii
import errno
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

# 100 megapixels: above the default output of every mainstream camera and phone (<= 50 MP), and
# since the model sees at most 1024x1024 px, larger inputs only cost memory and time. One image at
# the cap decodes to ~400 MB (RGBA) before it is shrunk. Raise Tokenizer.max_image_pixels for
# more (files past 2x PIL's Image.MAX_IMAGE_PIXELS, ~179 MP, are also refused by PIL's own check).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
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


def allowed_local(path: Path, where: str, limits: MediaLimits) -> Path:
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


def regular_file_mode(path: Path, name: str, where: str) -> int | None:
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


def read_capped_file(path: Path, name: str, where: str, limits: MediaLimits) -> bytes:
    cap = limits.max_image_bytes
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as e:  # unreadable, or gone since it was checked
        raise ValueError(f"{where}: cannot read {name}: {e.strerror or e}") from None
    if len(data) > cap:
        raise ValueError(f"{where}: the image is over {cap} bytes ({limits.setting('max_image_bytes')})")
    return data


def not_a_file(path: Path, mode: int | None) -> str:
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
