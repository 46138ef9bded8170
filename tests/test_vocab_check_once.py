"""The bounds that depend on the vocabulary (top_k, stop ids, logprobs) are checked once per
request: by whoever builds its parameters first (the server's input processor, or the engine's
add_request / generate), never again by the engine or the prefill."""
from unittest.mock import patch

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime import sampling
from pixtral_fast.serve.chat import sampling_params
from pixtral_fast.serve.protocol import ChatRequest
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded, Tokenizer


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return pf.Engine.from_model(model, Tokenizer.for_checkpoint(folder), num_blocks=32, progress=False)


def request(i: int) -> Encoded:
    return Encoded(tokens=[1] + [1000 + i + t for t in range(9)], images=[])


@pytest.fixture
def checks():
    calls = []
    real = sampling.check_vocab_bounds

    def counting(params, vocab_size):
        calls.append(vocab_size)
        return real(params, vocab_size)

    with patch.object(sampling, "check_vocab_bounds", counting):
        yield calls


def test_a_batch_through_generate_is_checked_once(engine, checks):
    out = engine.generate([request(i) for i in range(3)], max_new_tokens=3, top_k=5)
    assert [c.finish_reason for c in out] == ["length"] * 3
    assert checks == [engine.vocab_size]  # one parameters object for the batch, checked once


def test_parameters_the_server_checked_are_not_checked_again(engine, checks):
    req = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_k": 5,
                                      "logprobs": True, "top_logprobs": 2, "max_tokens": 3})
    params = sampling_params(req, prompt_tokens=10, max_model_len=engine.max_model_len,
                             vocab_size=engine.vocab_size, index=0)
    assert checks == [engine.vocab_size]
    seq = engine.add_request(request(7), params)  # its stop ids default to EOS: a copy, still checked
    while not seq.finished:
        engine.step()
    assert seq.finish_reason == "length" and len(seq.logprobs) == 3
    assert checks == [engine.vocab_size]


def test_a_default_stop_outside_the_checked_vocabulary_is_checked_again():
    params = pf.SamplingParams(top_k=3)
    params.check_vocab(10)
    assert params.with_stop_token_ids((4,))._checked_vocab == 10
    with pytest.raises(ValueError, match=r"stop_token_ids must lie in \[0, 10\), got 12"):
        params.with_stop_token_ids((12,)).check_vocab(10)
