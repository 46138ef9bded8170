"""Image URLs in the server's media layer (serve/media.py): hosts IDNA refuses, a redirect to one or
with no Location, data URL schemes in capitals and empty data URL payloads are each a clear 400
naming the URL, never a 500."""
import asyncio
import base64

import httpx
import pytest

from pixtral_fast.serve.media import ImageSource, MediaLimits, fetch_remote, load_images, media_client
from pixtral_fast.serve.protocol import APIError
from tests.support.serve_server import picture, png_bytes

PARAM = "messages[0].content[0].image_url.url"


def refusal(call) -> str:
    with pytest.raises(APIError) as caught:
        call()
    assert caught.value.status == 400 and caught.value.param == PARAM, caught.value.message
    return caught.value.message


def fetch(url: str, handler) -> ImageSource:
    source = ImageSource(url, PARAM)

    async def run():
        async with media_client(httpx.MockTransport(handler)) as client:
            await fetch_remote([source], MediaLimits(fetch_timeout=10), client)
    asyncio.run(run())
    return source


def never(request):
    raise AssertionError(f"fetched {request.url}")


def load(url: str) -> ImageSource:
    source = ImageSource(url, PARAM)
    load_images([source], MediaLimits())
    return source


def data_url_of(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("url", ["http://xn--/x.png", "http://xn--zz/x", "http://xn--ls8h.la/x"])
def test_a_host_idna_refuses_is_a_400_naming_the_url(url):
    assert f"{url!r} is not a valid URL" in refusal(lambda: fetch(url, never))


def test_a_redirect_to_a_host_idna_refuses_is_a_400_naming_the_redirect():
    def handle(request):
        return httpx.Response(302, headers={"Location": "http://xn--/x.png"})
    assert "redirected to 'http://xn--/x.png' is not a valid URL" in refusal(lambda: fetch("http://a.test/x", handle))


def test_a_redirect_with_an_empty_location_says_so():
    def handle(request):
        return httpx.Response(302, headers={"Location": ""})
    assert "empty Location header" in refusal(lambda: fetch("http://a.test/x", handle))


def test_a_data_url_scheme_in_capitals_is_a_data_url():
    image = png_bytes(picture(5, 3, 1))
    assert load("DATA:image/png;BASE64," + base64.b64encode(image).decode()).image.size == (5, 3)


def test_an_empty_data_url_payload_says_so():
    assert "the data URL's payload is empty" in refusal(lambda: load("data:image/png;base64,"))
