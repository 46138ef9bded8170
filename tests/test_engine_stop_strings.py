"""Stop strings offline: Engine.generate / Engine.stream(..., stop=[...]) end the text before the
first stop string, with finish_reason 'stop', as the server's `stop` does (the AsyncEngine gives
the same answer); the sequence ends in the step that completes the stop string, its blocks freed;
stop strings out of bounds are refused with a ValueError naming `stop`."""
import asyncio

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.async_engine import AsyncEngine
from pixtral_fast.runtime.output import MAX_STOP, MAX_STOP_CHARS
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer
from tests.support.serve_server import user_message

MAX_NEW = 24
PROMPT = user_message("Two, text only.")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return pf.Engine.from_model(model, Tokenizer.for_checkpoint(folder), num_blocks=64, progress=False)


@pytest.fixture(scope="module")
def greedy(engine):
    """The request's whole greedy answer, and a stop string from its middle."""
    full = engine.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert full.finish_reason == "length" and len(full.text) > 12, full
    return full, full.text[5:9]


def test_generate_ends_before_the_stop_string_with_finish_reason_stop(engine, greedy):
    full, stop = greedy
    got = engine.generate(PROMPT, max_new_tokens=MAX_NEW, stop=[stop])
    assert got.text == full.text[:full.text.find(stop)]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    # generation ended at the token that completed the stop string, not at max_new_tokens
    assert got.tokens == full.tokens[:len(got.tokens)] and len(got.tokens) < MAX_NEW
    assert stop in engine.tokenizer.decode(got.tokens) and stop not in engine.tokenizer.decode(got.tokens[:-1])


def test_the_sequence_finishes_in_the_step_that_completes_the_stop_string(engine, greedy):
    full, stop = greedy
    seq = engine.add_request(PROMPT, pf.SamplingParams(max_new_tokens=MAX_NEW), stop=stop)
    while not seq.finished:
        engine.step()
        if stop not in engine.tokenizer.decode(seq.generated):
            assert not seq.finished
    assert seq.finish_reason == "stop" and stop not in engine.tokenizer.decode(seq.generated[:-1])
    assert engine.usage().used_blocks == 0 and not engine.has_unfinished()
    assert engine.text_output(seq).read()[0] == full.text[:full.text.find(stop)]


def test_stream_and_a_batch_end_as_generate_does(engine, greedy):
    full, stop = greedy
    expected = full.text[:full.text.find(stop)]
    assert "".join(engine.stream(PROMPT, max_new_tokens=MAX_NEW, stop=stop)) == expected
    batch = engine.generate([PROMPT, user_message("Another one.")], max_new_tokens=MAX_NEW, stop=[stop, "zzzz"])
    assert batch[0].text == expected and batch[0].finish_reason == "stop"
    assert "zzzz" not in batch[1].text and stop not in batch[1].text


def test_the_async_engine_gives_the_offline_answer(engine, greedy):
    full, stop = greedy
    offline = engine.generate(PROMPT, max_new_tokens=MAX_NEW, stop=[stop], logprobs=2)
    assert len(offline.logprobs) == len(offline.tokens) and len(offline.logprobs[0].top) == 2

    async def main():
        async with AsyncEngine(engine) as ae:
            return await ae.generate(PROMPT, pf.SamplingParams(max_new_tokens=MAX_NEW, logprobs=2), stop=[stop])

    result = asyncio.run(main())
    assert result == offline  # one result type: text, tokens, finish and stop reasons, logprobs
    assert (result.text, result.tokens, result.finish_reason, result.stop_reason) == \
        (offline.text, offline.tokens, offline.finish_reason, offline.stop_reason)
    assert engine.usage().used_blocks == 0


def test_a_stop_token_is_the_stop_reason_of_its_stop(engine, greedy):
    full, _ = greedy
    token = full.tokens[2]
    seq = engine.add_request(PROMPT, pf.SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(token,)))
    while not seq.finished:
        engine.step()
    assert seq.generated == full.tokens[:full.tokens.index(token) + 1] and seq.finish_reason == "stop"
    assert engine.text_output(seq).stop_reason(seq.finish_reason, seq.generated) == token
    assert full.stop_reason is None  # a 'length' has none


@pytest.mark.parametrize("stop, problem", [
    (["x"] * (MAX_STOP + 1), f"at most {MAX_STOP} stop strings"),
    ("y" * (MAX_STOP_CHARS + 1), f"at most {MAX_STOP_CHARS} characters"),
    ("", "non-empty"),
    (["ok", ""], "non-empty"),
    ([3], "non-empty strings"),
])
def test_stop_strings_out_of_bounds_are_refused_naming_stop(engine, stop, problem):
    for call in (lambda: engine.generate(PROMPT, max_new_tokens=2, stop=stop),
                 lambda: engine.stream(PROMPT, max_new_tokens=2, stop=stop),
                 lambda: engine.add_request(PROMPT, pf.SamplingParams(max_new_tokens=2), stop=stop)):
        with pytest.raises(ValueError, match=f"^stop: .*{problem}"):
            call()

    async def submit():
        async with AsyncEngine(engine) as ae:
            await ae.submit(PROMPT, pf.SamplingParams(max_new_tokens=2), stop=stop)

    with pytest.raises(ValueError, match=f"^stop: .*{problem}"):
        asyncio.run(submit())
    assert not engine.has_unfinished()


def test_stop_strings_at_the_bounds_are_taken(engine):
    stops = ["z" * MAX_STOP_CHARS] * (MAX_STOP - 1) + ["\x00"]
    got = engine.generate(PROMPT, max_new_tokens=3, stop=stops)
    assert got.finish_reason == "length" and len(got.tokens) == 3
