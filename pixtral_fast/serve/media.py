"""OpenAI chat messages -> the tokenizer's messages, with their images.

Three phases, so that nothing slow runs on the event loop: `parse_messages` checks the structure
and notes each image's source (cheap, on the loop); `fetch_remote` downloads http(s) images with a
timeout and a byte cap (async); `load_images` decodes every image (base64, file, bytes) with a
pixel cap, in the engine's thread pool, just before tokenization."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from pixtral_fast.images import prepare_image
from pixtral_fast.serve.protocol import APIError


MAX_REDIRECTS = 5
NAME_MAX = 255      # bytes in one file name (Linux, macOS)
PATH_MAX = 4096     # bytes in a whole path (Linux)
LOCAL_HOSTS = ("", "localhost")  # a file:// URL names no host, or this machine
# urllib's urlsplit keeps its last 128 URLs in a cache (Python 3.11): a client's URLs, data: URLs
# of megabytes among them, must not outlive their request
_split = getattr(urlsplit, "__wrapped__", urlsplit)


@dataclass
class MediaLimits:
    max_images_per_prompt: int = 8
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 << 20           # an encoded image: data URL payload, file or download
    allowed_local_media_path: Path | None = None
    fetch_timeout: float = 10.0


@dataclass
class ImageSource:
    url: str
    param: str                                # where it sits in the request, for errors
    data: bytes | None = None                 # fetched bytes (http) — decoded later
    image: Image.Image | None = field(default=None, repr=False)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


def _text_of(content: Any, param: str) -> str:
    """System / assistant content: a string or text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{j}]", "only text parts are allowed here")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(param, "content must be a string or a list of parts")


def parse_messages(messages: list[dict], limits: MediaLimits) -> tuple[list[dict], list[ImageSource]]:
    """Tokenizer messages (images as ImageSource placeholders) and the image sources in order."""
    out, sources = [], []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(at, "a message must be an object with a role")
        role = m.get("role")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _text_of(m.get("content"), f"{at}.content")})
        elif role == "assistant":
            if m.get("tool_calls"):
                raise _bad(f"{at}.tool_calls", "tool calls are not supported")
            out.append({"role": "assistant", "content": _text_of(m.get("content"), f"{at}.content")})
        elif role == "user":
            out.append({"role": "user", "content": _user_parts(m.get("content"), f"{at}.content", sources)})
        else:
            raise _bad(f"{at}.role", f"role must be system, user or assistant, got {role!r}")
    if len(sources) > limits.max_images_per_prompt:
        raise APIError(400, f"messages: {len(sources)} images in the prompt; at most "
                            f"{limits.max_images_per_prompt} are allowed (--max-images-per-prompt)", "messages")
    return out, sources


def _user_parts(content: Any, at: str, sources: list[ImageSource]) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(at, "content must be a string or a non-empty list of parts")
    parts = []
    for j, part in enumerate(content):
        where = f"{at}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}.text", "must be a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise _bad(f"{where}.image_url.url", "must be a non-empty string")
            source = ImageSource(url, f"{where}.image_url.url")
            sources.append(source)
            parts.append({"type": "image", "image": source})
        else:
            raise _bad(where, f"unknown content part type {kind!r} (text, image_url)")
    return parts


async def fetch_remote(sources: list[ImageSource], limits: MediaLimits, client: httpx.AsyncClient) -> None:
    """Downloads the http(s) images (bytes only; decoding happens in the pool). One deadline,
    `limits.fetch_timeout` seconds, covers the whole fetch (connecting and every read of every
    image, redirects included): httpx's own timeout is per read, which a server trickling bytes
    never trips."""
    remote = [s for s in sources if _parse_url(s.url, s.param).scheme.lower() in ("http", "https")]
    current = None
    try:
        async with asyncio.timeout(limits.fetch_timeout):
            for current in remote:
                await _fetch_one(current, limits, client)
    except (TimeoutError, httpx.TimeoutException):
        raise _bad(current.param, f"fetching the image did not finish within {limits.fetch_timeout} s "
                                  "(--media-fetch-timeout)") from None


def _parse_url(url: str, param: str) -> SplitResult:
    try:
        return _split(url)
    except ValueError as e:  # an unclosed IPv6 bracket, say
        raise _bad(param, f"{_shown(url)} is not a valid URL ({e})") from None


def _shown(text: str, limit: int = 80) -> str:
    """A client's URL or path in an error message: quoted, and cut, since it may be megabytes."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


class BadURL(ValueError):
    """An image URL, or a redirect's Location, that is not fetched; the caller names the param."""


def _http_url(url: str, redirected: bool = False) -> httpx.URL:
    """`url` as httpx will fetch it; BadURL unless it is a well-formed http(s) URL. For a
    redirect, the message names the Location the image URL redirected to."""
    where = f"the image URL redirected to {_shown(url)}" if redirected else _shown(url)
    try:
        parsed = _split(url)
        if parsed.scheme.lower() not in ("http", "https"):
            raise BadURL(f"{where}: only redirects to http(s) URLs are followed" if redirected
                         else f"{where} is not an http(s) URL")
        parsed.port  # noqa: B018 - reading it checks it (urllib raises for 99999 or 'x')
        fetched = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        if isinstance(e, BadURL):
            raise
        raise BadURL(f"{where} is not a valid URL ({e})") from None
    if not fetched.host:
        raise BadURL(f"{where} names no host")
    return fetched


def _redirect_target(response: httpx.Response) -> httpx.URL:
    location = response.headers["location"]
    try:
        joined = str(response.url.join(location))
    except (ValueError, httpx.InvalidURL) as e:
        raise BadURL(f"the image URL redirected to {_shown(location)}, which is not a valid URL ({e})") from None
    return _http_url(joined, redirected=True)


async def _check_redirect(response: httpx.Response) -> None:
    if response.has_redirect_location:
        _redirect_target(response)


def media_client(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The server's client for image URLs. It follows no redirect itself (fetch_remote does, hop by
    hop), and its response hook refuses a bad redirect before httpx parses the Location: httpx
    raises a bare InvalidURL for a redirect to a data: URL, which names neither URL."""
    return httpx.AsyncClient(transport=transport, follow_redirects=False,
                             event_hooks={"response": [_check_redirect]})


async def _fetch_one(s: ImageSource, limits: MediaLimits, client: httpx.AsyncClient) -> None:
    """Follows up to MAX_REDIRECTS redirects itself, so that each hop is checked as the first URL
    is: a redirect to data:, file: or any other scheme is refused, not fetched or half-handled."""
    try:
        url = _http_url(s.url)
        for _ in range(MAX_REDIRECTS + 1):
            async with client.stream("GET", url, timeout=limits.fetch_timeout, follow_redirects=False) as response:
                if response.has_redirect_location:
                    url = _redirect_target(response)
                    continue
                if response.status_code != 200:
                    raise _bad(s.param, f"fetching the image gave HTTP {response.status_code}")
                s.data = await _read_capped(response, s.param, limits.max_image_bytes)
                return
    except BadURL as e:
        raise _bad(s.param, str(e)) from None
    except httpx.TimeoutException:
        raise
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise _bad(s.param, f"could not fetch the image ({type(e).__name__}: {e})") from None
    raise _bad(s.param, f"the image URL redirected more than {MAX_REDIRECTS} times")


async def _read_capped(response: httpx.Response, param: str, cap: int) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > cap:
            raise _bad(param, f"the image is over {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def load_images(sources: list[ImageSource], limits: MediaLimits, max_side: int | None = None) -> None:
    """Decodes every source into a PIL image (blocking: run it in the thread pool). With
    `max_side` (the tokenizer's max_image_side) each is prepared as the offline engine prepares
    an image it opens itself (pixtral_fast.images.prepare_image): shrunk to the model's size, a
    large JPEG decoded at reduced scale, so that server and offline answers agree."""
    for s in sources:
        s.image = _decode(_raw_bytes(s, limits), s.param, limits, max_side)


def _raw_bytes(s: ImageSource, limits: MediaLimits) -> bytes:
    if s.data is not None:
        return s.data
    url = s.url
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise _bad(s.param, "a data URL must look like data:image/<type>;base64,<payload>")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise _bad(s.param, f"the image is over {limits.max_image_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(s.param, "the data URL's payload is not valid base64") from None
    parsed = _parse_url(url, s.param)
    if not parsed.scheme:
        raise _bad(s.param, f"{url[:80]!r} is not a URL: give the image as a data:image/...;base64, URL, "
                            "an http(s):// URL or a file:// URL")
    if parsed.scheme.lower() == "file":
        return _read_local(_local_path(parsed, s.param), s.param, limits)
    raise _bad(s.param, f"unsupported image URL scheme {parsed.scheme or url[:16]!r} (data:, http(s)://, file://)")


def _local_path(parsed: SplitResult, param: str) -> Path:
    """The path of a file:// URL. A host other than this machine is refused, not dropped:
    file://images/x.png names the host 'images' (a relative path is not a file URL)."""
    if parsed.netloc.lower() not in LOCAL_HOSTS:
        raise _bad(param, f"the file:// URL names the host {_shown(parsed.netloc)}; only this machine's files are "
                          "read: file:///absolute/path or file://localhost/absolute/path")
    path = unquote(parsed.path, errors="surrogateescape")  # %ff: the file name's own byte, as os reads it
    if not path.startswith("/"):  # file:x.png would be read from the server's working folder
        raise _bad(param, f"the file:// URL's path {_shown(path)} is not absolute: write file:///absolute/path")
    if "\0" in path:
        raise _bad(param, "the file:// URL's path holds a NUL character")
    _check_path_length(path, param)
    return Path(path)


def _check_path_length(path: str, param: str) -> None:
    """The system's own limits, named, rather than its ENAMETOOLONG."""
    try:
        encoded = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise _bad(param, "the file:// URL's path holds a lone surrogate (not valid UTF-8)") from None
    if len(encoded) > PATH_MAX:
        raise _bad(param, f"the file path is {len(encoded)} bytes long; at most {PATH_MAX} are allowed (PATH_MAX)")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise _bad(param, f"a file name in the path is {len(longest)} bytes long; at most {NAME_MAX} are "
                          "allowed (NAME_MAX)")


def _read_local(path: Path, param: str, limits: MediaLimits) -> bytes:
    root = limits.allowed_local_media_path
    if root is None:
        raise _bad(param, "file:// URLs are refused: the server was started without --allowed-local-media-path")
    try:
        return _read_under(root, path, param, limits.max_image_bytes)
    except RuntimeError:  # Python < 3.13 reports a symlink loop so, later ones as OSError ELOOP
        raise _bad(param, f"{_shown(str(path))} is a symlink loop") from None
    except OSError as e:  # too long for the system, unreadable, or gone since it was resolved
        raise _bad(param, f"cannot read {_shown(str(path))}: {e.strerror or e}") from None


def _read_under(root: Path, path: Path, param: str, cap: int) -> bytes:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise _bad(param, f"{_shown(str(path))} is outside the allowed local media path")
    if not resolved.exists():
        raise _bad(param, f"no such file: {_shown(str(path))}")
    if not resolved.is_file():
        raise _bad(param, f"{_shown(str(path))} is not a regular file")
    if resolved.stat().st_size > cap:
        raise _bad(param, f"the image is over {cap} bytes")
    return resolved.read_bytes()


def _decode(data: bytes, param: str, limits: MediaLimits, max_side: int | None = None) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        pixels = img.width * img.height  # from the header: checked before decoding the pixels
        if pixels > limits.max_image_pixels:
            raise _bad(param, f"the image has {img.width}x{img.height} = {pixels} pixels; at most "
                              f"{limits.max_image_pixels} are allowed (--max-image-pixels)")
        if pixels == 0:
            raise _bad(param, f"the image has zero size ({img.width}x{img.height})")
        if max_side is None:
            img.load()
        else:
            try:
                img = prepare_image(img, max_side, param, owned=True)
            except ValueError as e:  # names the image (param) already
                raise APIError(400, str(e), param) from None
    except Image.DecompressionBombError as e:  # PIL refuses it from the header, before our own check
        size = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{size.group(1)} pixels" if size else "more pixels than PIL decodes"
        raise _bad(param, f"the image is too large: it has {pixels}; at most {limits.max_image_pixels} "
                          "are allowed (--max-image-pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, NotImplementedError) as e:
        # NotImplementedError: a format PIL knows, in a variant it cannot decode (DDS pixel flags)
        raise _bad(param, f"not a readable image ({type(e).__name__}: {e})") from None
    return img


def with_images(messages: list[dict]) -> list[dict]:
    """The tokenizer's messages: each ImageSource replaced by its decoded image."""
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            m = {**m, "content": [{"type": "image", "image": p["image"].image} if p["type"] == "image" else p
                                  for p in m["content"]]}
        out.append(m)
    return out
