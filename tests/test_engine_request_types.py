"""The types of what a request hands the engine: badly typed Encoded.images or tokens fail the
request with a message naming them (not a raw torch/pydantic error), and stream() refuses a batch."""
import numpy as np
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.tokenizer import Encoded
from tests.support.engines import assert_clean, model, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.test_engine import chat


PIXELS = np.zeros((3, 32, 48), dtype=np.float32)


@pytest.mark.parametrize("images, message", [
    (None, "images must be a list of .* got NoneType"),
    ("abc", "images must be a list of .* got str"),
    (torch.zeros(3, 32, 48), "images must be a list of .* got Tensor"),  # not 3 images of its channels
    (PIXELS, "images must be a list of .* got ndarray"),
    (["x"], r"images\[0\] must be a \[3, H, W\] pixel array .* got str"),
    ([PIXELS, None], r"images\[1\] must be a \[3, H, W\] pixel array .* got NoneType"),
])
def test_badly_typed_images_fail_the_request_with_a_message_naming_them(model, tok, images, message):
    eng = new_engine(model, tok)
    request = Encoded(tokens=[1, 5, 6], images=images)
    seq = eng.add_request(request, pf.SamplingParams(max_new_tokens=2))
    assert seq.finish_reason == "error" and seq.error is not None
    assert not seq.error.startswith(("TypeError", "RuntimeError")), seq.error
    with pytest.raises(pf.RequestError, match=message):
        eng.generate(request, max_new_tokens=2)
    assert_clean(eng)


@pytest.mark.parametrize("tokens, message", [
    (None, "tokens must be a list of token ids, got NoneType"),
    ("1 5 6", "tokens must be a list of token ids, got str"),
    ([[1, 5], [6]], r"tokens\[0\] must be an int token id"),
])
def test_badly_typed_tokens_fail_the_request_with_a_message_naming_them(model, tok, tokens, message):
    eng = new_engine(model, tok)
    with pytest.raises(pf.RequestError, match=message):
        eng.generate(Encoded(tokens=tokens, images=[]), max_new_tokens=2)
    assert_clean(eng)


def test_stream_refuses_a_batch(model, tok):
    eng = new_engine(model, tok)
    msgs = chat("hi")
    with pytest.raises(ValueError, match=r"stream\(\) takes one request, not a batch; use generate\(\)"):
        eng.stream([msgs, msgs], max_new_tokens=2)  # at the call, before the first next()
    assert_clean(eng)
    assert "".join(eng.stream(msgs, max_new_tokens=2)) == eng.generate(msgs, max_new_tokens=2).text
