"""A client's chat messages -> the tokenizer's prompt, with its images.

The parser and the decoder are the library's (pixtral_fast.messages.parse_messages,
pixtral_fast.images), run under the server's MediaLimits; what only the server does is here:
fetching http(s) images, and answering refusals as 400s naming the param. Three phases, so that
nothing slow runs on the event loop: `parse_messages` checks the structure and notes each image's
source (cheap, on the loop); `fetch_remote` downloads http(s) images with a timeout and a byte cap
(async); `load_images` decodes every image (base64, file, bytes) with a pixel cap, in the engine's
thread pool, just before tokenization."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import httpx

from pixtral_fast import images
from pixtral_fast import messages as message_parser
from pixtral_fast.images import parse_url, shown, split_url
from pixtral_fast.messages import ImageSource, InputError, Prompt, decode_images
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


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


def parse_messages(messages: list[dict], limits: MediaLimits) -> Prompt:
    """The client's messages through the one parser (pixtral_fast.messages), refusals as 400s."""
    try:
        return message_parser.parse_messages(messages, limits)
    except InputError as e:
        raise APIError(400, str(e), e.param) from None


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
        return parse_url(s.source, s.param)
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
        host = fetched.host  # httpx decodes an IDNA host (xn--...) only here: IDNAError, a ValueError
    except (ValueError, httpx.InvalidURL) as e:
        if isinstance(e, BadURL):
            raise
        raise BadURL(f"{where} is not a valid URL ({e})") from None
    if not host:
        raise BadURL(f"{where} names no host")
    return fetched


def _redirect_target(response: httpx.Response) -> httpx.URL:
    location = response.headers["location"]
    if not location.strip():  # httpx would take it as the same URL again, a loop
        raise BadURL(f"the image URL answered HTTP {response.status_code} with an empty Location header")
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
        url = _http_url(s.source)
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
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:  # UnicodeError: a host IDNA refuses
        raise _bad(s.param, f"could not fetch the image {shown(s.source)} ({type(e).__name__}: {e})") from None
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
    """Decodes every source (blocking: run it in the thread pool) through the library's decoder
    under the server's limits. With `max_side` (the tokenizer's max_image_side) each is prepared as
    the offline engine prepares an image: shrunk to the model's size, a large JPEG decoded at
    reduced scale, so that server and offline answers agree."""
    try:
        decode_images(sources, limits, max_side)
    except InputError as e:
        raise APIError(400, str(e), e.param) from None
