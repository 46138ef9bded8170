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
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image, UnidentifiedImageError

from pixtral_fast.images import prepare_image
from pixtral_fast.serve.protocol import APIError


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
    image): httpx's own timeout is per read, which a server trickling bytes never trips."""
    remote = [s for s in sources if urlparse(s.url).scheme.lower() in ("http", "https")]
    current = None
    try:
        async with asyncio.timeout(limits.fetch_timeout):
            for current in remote:
                await _fetch_one(current, limits, client)
    except (TimeoutError, httpx.TimeoutException):
        raise _bad(current.param, f"fetching the image did not finish within {limits.fetch_timeout} s "
                                  "(--media-fetch-timeout)") from None


async def _fetch_one(s: ImageSource, limits: MediaLimits, client: httpx.AsyncClient) -> None:
    try:
        async with client.stream("GET", s.url, timeout=limits.fetch_timeout) as response:
            if response.status_code != 200:
                raise _bad(s.param, f"fetching the image gave HTTP {response.status_code}")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise _bad(s.param, f"the image is over {limits.max_image_bytes} bytes")
                chunks.append(chunk)
            s.data = b"".join(chunks)
    except httpx.TimeoutException:
        raise
    except httpx.HTTPError as e:
        raise _bad(s.param, f"could not fetch the image ({type(e).__name__}: {e})") from None


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
    parsed = urlparse(url)
    if not parsed.scheme:
        raise _bad(s.param, f"{url[:80]!r} is not a URL: give the image as a data:image/...;base64, URL, "
                            "an http(s):// URL or a file:// URL")
    if parsed.scheme == "file":
        return _read_local(Path(unquote(parsed.path)), s.param, limits)
    raise _bad(s.param, f"unsupported image URL scheme {parsed.scheme or url[:16]!r} (data:, http(s)://, file://)")


def _read_local(path: Path, param: str, limits: MediaLimits) -> bytes:
    root = limits.allowed_local_media_path
    if root is None:
        raise _bad(param, "file:// URLs are refused: the server was started without --allowed-local-media-path")
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise _bad(param, f"{path} is outside the allowed local media path")
    if not resolved.is_file():
        raise _bad(param, f"no such file: {path}")
    if resolved.stat().st_size > limits.max_image_bytes:
        raise _bad(param, f"the image is over {limits.max_image_bytes} bytes")
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
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
