"""One input processor: the library (Tokenizer.encode) and the server (serve/media's parse, fetch
and decode phases, then Tokenizer.encode of the parsed Prompt) run the same message parser and the same image
decoder, so the same messages give the same tokens and pixels, and the same bad input the same
refusal. Called in-process: no server is started."""
import base64
import os
from pathlib import Path

import numpy as np
import pytest

from pixtral_fast.serve.media import MediaLimits, load_images, parse_messages
from pixtral_fast.serve.protocol import APIError
from pixtral_fast.tokenizer import Tokenizer
from tests.support.serve_server import data_url, picture, png_bytes, user_message


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    picture(30, 20, 1).save(folder / "a b.png")
    # a file name that is not UTF-8: file:///...%FF.png names this byte, in both paths
    (folder / os.fsdecode(b"\xff.png")).write_bytes(png_bytes(picture(50, 40, 2)))
    return folder


def server_limits(tok: Tokenizer, media_dir) -> MediaLimits:
    return MediaLimits(allowed_local_media_path=media_dir, max_image_pixels=tok.max_image_pixels,
                       max_images_per_prompt=100)


def served(tok: Tokenizer, messages: list[dict], media_dir):
    """What the server's chat route does with the messages, minus HTTP."""
    limits = server_limits(tok, media_dir)
    prompt = parse_messages(messages, limits)
    load_images(prompt.images, limits, tok.max_image_side)
    return tok.encode(prompt)


def conversations(media_dir) -> dict[str, list[dict]]:
    file_url = (media_dir / "a b.png").as_uri()
    odd_byte_url = f"file://{media_dir}/%FF.png"
    big = data_url(picture(1500, 700, 3))  # shrunk to the model's size by both
    return {
        "data URL": user_message("What is this?", data_url(picture(40, 30, 0))),
        "file URL": user_message("And this?", file_url),
        "file URL with a %XX byte": user_message("And this?", odd_byte_url),
        "text and image parts, several images": [
            # several text parts: joined as mistral_common joins them, on both paths
            {"role": "system", "content": [{"type": "text", "text": "Be brief."},
                                           {"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                         {"type": "image_url", "image_url": {"url": file_url}},
                                         {"type": "text", "text": " with "},
                                         {"type": "image_url", "image_url": big}]},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": odd_byte_url}},
                                         {"type": "text", "text": "And now?"}]}],
    }


@pytest.mark.parametrize("case", list(conversations(Path("/m"))))
def test_library_and_server_give_the_same_tokens_and_pixels(tok, media_dir, case):
    messages = conversations(media_dir)[case]
    library, server = tok.encode(messages), served(tok, messages, media_dir)
    assert library.tokens == server.tokens
    assert len(library.images) == len(server.images) == sum(
        p.get("type") == "image_url" for m in messages if isinstance(m["content"], list) for p in m["content"])
    for ours, theirs in zip(library.images, server.images):
        np.testing.assert_array_equal(ours, theirs)


def bad_inputs(media_dir) -> dict[str, list[dict]]:
    png = base64.b64encode(png_bytes(picture(8, 8, 0))).decode()
    return {
        "payload not base64": user_message("?", "data:image/png;base64,!!!"),
        "data URL without base64": user_message("?", "data:image/png,abc"),
        "data URL of no image type": user_message("?", "data:application/octet-stream;base64," + png),
        "file URL naming a host": user_message("?", f"file://relative{media_dir}/a%20b.png"),
        "relative file URL": user_message("?", "file:a.png"),
        "file name over NAME_MAX": user_message("?", f"file://{media_dir}/{'n' * 256}.png"),
        "NUL in a file URL": user_message("?", f"file://{media_dir}/a%00.png"),
        "unknown role": [{"role": "wizard", "content": "hi"}],
        "text part without text": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        "empty content": [{"role": "user", "content": []}],
        "image_url without url": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        "system without content": [{"role": "system", "content": None}, {"role": "user", "content": "?"}],
        "assistant tool calls": [{"role": "user", "content": "?"},
                                 {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
                                 {"role": "user", "content": "?"}],
    }


def split_where(message: str) -> tuple[str, str]:
    where, _, problem = message.partition(": ")
    return where, problem


@pytest.mark.parametrize("case", list(bad_inputs(Path("/m"))))
def test_library_and_server_refuse_the_same_input_alike(tok, media_dir, case):
    messages = bad_inputs(media_dir)[case]
    with pytest.raises(ValueError) as library:
        tok.encode(messages)
    with pytest.raises(APIError) as server:
        served(tok, messages, media_dir)
    assert server.value.status == 400
    library_where, library_problem = split_where(str(library.value))
    server_where, server_problem = split_where(server.value.message)
    assert library_problem == server_problem, (str(library.value), server.value.message)
    # the server names the same place, down to the URL itself (its error param)
    assert server_where.startswith(library_where) and server.value.param.startswith(library_where)
