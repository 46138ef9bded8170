"""OpenAI chat messages -> the tokenizer's messages, with their images.

Three phases, so that nothing slow runs on the event loop: `parse_messages` checks the structure
and notes each image's source (cheap, on the loop); `fetch_remote` downloads http(s) images with a
timeout and a byte cap (async); `load_images` decodes every image (base64, file, bytes) with a
pixel cap, in the engine's thread pool, just before tokenization."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from pixtral_fast import images
from pixtral_fast.images import load_image, parse_url, shown, split_url
from pixtral_fast.serve.protocol import APIError


MAX_REDIRECTS = 5


@dataclass
class MediaLimits(images.MediaLimits):
    """The library's MediaLimits with the server's defaults: a client's images are URLs, read
    under these caps, and file:// URLs only below --allowed-local-media-path."""
    max_images_per_prompt: int | None = 8
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int | None = 20 << 20
    allowed_local_media_path: Path | None = None
    fetch_timeout: float = 10.0
    server: bool = True


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
    remote = [s for s in sources if _parse_url(s).scheme.lower() in ("http", "https")]
    current = None
    try:
        async with asyncio.timeout(limits.fetch_timeout):
            for current in remote:
                await _fetch_one(current, limits, client)
    except (TimeoutError, httpx.TimeoutException):
        raise _bad(current.param, f"fetching the image did not finish within {limits.fetch_timeout} s "
                                  "(--media-fetch-timeout)") from None


def _parse_url(s: ImageSource):
    try:
        return parse_url(s.url, s.param)
    except ValueError as e:
        raise APIError(400, str(e), s.param) from None


class BadURL(ValueError):
    """An image URL, or a redirect's Location, that is not fetched; the caller names the param."""


def _http_url(url: str, redirected: bool = False) -> httpx.URL:
    """`url` as httpx will fetch it; BadURL unless it is a well-formed http(s) URL. For a
    redirect, the message names the Location the image URL redirected to."""
    where = f"the image URL redirected to {shown(url)}" if redirected else shown(url)
    try:
        parsed = split_url(url)
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
        raise BadURL(f"the image URL redirected to {shown(location)}, which is not a valid URL ({e})") from None
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
    """Decodes every source into a PIL image (blocking: run it in the thread pool), through the
    library's decoder (pixtral_fast.images) under the server's limits. With `max_side` (the
    tokenizer's max_image_side) each is prepared as the offline engine prepares an image: shrunk to
    the model's size, a large JPEG decoded at reduced scale, so that server and offline answers agree."""
    for s in sources:
        try:
            s.image = load_image(s.data if s.data is not None else s.url, s.param, limits=limits,
                                 max_side=max_side)
        except ValueError as e:  # names the image (param) already
            raise APIError(400, str(e), s.param) from None


def with_images(messages: list[dict]) -> list[dict]:
    """The tokenizer's messages: each ImageSource replaced by its decoded image."""
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            m = {**m, "content": [{"type": "image", "image": p["image"].image} if p["type"] == "image" else p
                                  for p in m["content"]]}
        out.append(m)
    return out
