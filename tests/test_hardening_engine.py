"""Engine inputs the red-team review of issue 8 found answered with raw torch/pydantic errors or
an allocator failure: badly typed Encoded.images / tokens, a batch passed to stream(), and engine
limits that no KV cache could run (or that contradict each other)."""
import numpy as np
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.config import MAX_BATCH_SIZE_LIMIT, EngineConfig
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


def test_max_batch_size_has_a_documented_upper_bound():
    with pytest.raises(ValueError, match=f"max_batch_size must be at most {MAX_BATCH_SIZE_LIMIT}, got 10000000"):
        EngineConfig(max_batch_size=10**7)
    assert EngineConfig(max_batch_size=MAX_BATCH_SIZE_LIMIT).max_batch_size == MAX_BATCH_SIZE_LIMIT


def test_max_batch_size_beyond_what_the_cache_could_run_is_refused(model, tok):
    with pytest.raises(ValueError, match=r"max_batch_size=1000 is more sequences than the KV cache could ever run"):
        new_engine(model, tok, num_blocks=64, max_batch_size=1000)
    eng = new_engine(model, tok, num_blocks=64, max_batch_size=63)  # 63 usable blocks: 63 sequences can run
    assert eng.decode_runner is not None
    new_engine(model, tok, num_blocks=4)  # the default batch size always passes (small buffers)


def test_num_blocks_and_memory_bytes_together_are_refused():
    with pytest.raises(ValueError, match="num_blocks or memory_bytes, not both"):
        EngineConfig(num_blocks=64, memory_bytes=1 << 30)
