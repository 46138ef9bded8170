"""A fault anywhere inside a step (prefill, decode, sampling, detokenization; any exception,
KeyboardInterrupt and SystemExit included) is the failing request's, never the engine's: once the
callers return, no block is held and nothing is left running or waiting, and the next call gives
what a fresh engine gives."""
from contextlib import contextmanager
from unittest.mock import patch

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pixtral_fast as pf
import pixtral_fast.runtime.decode_step as decode_step_module
import pixtral_fast.runtime.prefill as prefill_module
from tests.support.engines import assert_clean, model, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.test_engine import chat, picture

MAX_NEW = 3


@pytest.fixture(scope="module")
def requests(tok):
    """Encoded once: an image request and a text one."""
    return [tok.encode(chat("What is it?", picture(40, 24, 0))), tok.encode(chat("Text only, please."))]


@pytest.fixture(scope="module")
def expected(model, tok, requests):
    return new_engine(model, tok).generate(requests, max_new_tokens=MAX_NEW)


class Fault:
    """Replaces obj.name by a wrapper that raises make() at call number `at` (and every call after
    it when persistent)."""

    def __init__(self, make, at: int, persistent: bool):
        self.make, self.at, self.persistent, self.calls, self.fired = make, at, persistent, 0, 0

    @contextmanager
    def on(self, obj, name: str):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at or (self.persistent and self.calls > self.at):
                self.fired += 1
                raise self.make()
            return original(*args, **kwargs)

        with patch.object(obj, name, wrapper):
            yield


EXCEPTIONS = {
    "RuntimeError": lambda: RuntimeError("injected fault"),
    "ValueError": lambda: ValueError("injected fault"),
    "IndexError": lambda: IndexError("injected fault"),
    "OutOfMemoryError": lambda: torch.cuda.OutOfMemoryError("injected fault"),
    "KeyboardInterrupt": lambda: KeyboardInterrupt("injected fault"),
    "SystemExit": lambda: SystemExit("injected fault"),
}
# (where, attribute): the ViT, the decoder (prefill and decode), the LM head, the decode runner,
# sampling on both paths, the block manager, detokenization.
TARGETS = {
    "vit": lambda eng: (eng.model, "encode_images"),
    "decoder": lambda eng: (eng.model, "run_decoder"),
    "lm_head": lambda eng: (eng.model, "logits"),
    "decode_runner": lambda eng: (eng.decode_runner, "step"),
    "prefill_sampling": lambda eng: (prefill_module, "sample_rows"),
    "decode_sampling": lambda eng: (decode_step_module, "sample"),
    "block_append": lambda eng: (eng.blocks, "append"),
    "detokenize": lambda eng: (eng.tokenizer, "decode"),
}


def is_interrupt(name: str) -> bool:
    return not issubclass(type(EXCEPTIONS[name]()), Exception)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(sorted(TARGETS)), exc=st.sampled_from(sorted(EXCEPTIONS)), at=st.integers(1, 4),
       persistent=st.booleans(), streamed=st.booleans())
def test_a_fault_anywhere_leaves_the_engine_clean(model, tok, requests, expected, target, exc, at, persistent,
                                                  streamed):
    eng = new_engine(model, tok)
    fault = Fault(EXCEPTIONS[exc], at, persistent)
    interrupted, outcomes = False, []
    neighbour = None
    with fault.on(*TARGETS[target](eng)):
        try:
            if streamed:  # request 1 comes from another caller; request 0 is streamed
                neighbour = eng.add_request(requests[1], pf.SamplingParams(max_new_tokens=MAX_NEW))
                try:
                    outcomes.append(("text", "".join(eng.stream(requests[0], max_new_tokens=MAX_NEW))))
                except pf.RequestError as e:
                    outcomes.append(("error", str(e)))
            else:
                outcomes = [("completion", c) for c in eng.generate(requests, max_new_tokens=MAX_NEW)]
        except (KeyboardInterrupt, SystemExit) as e:
            assert is_interrupt(exc) and str(e) == "injected fault"
            interrupted = True
    assert interrupted == (is_interrupt(exc) and fault.fired > 0)
    if neighbour is not None:  # its caller goes on stepping (after an interrupt: re-prefilled, exact)
        while not neighbour.finished:
            eng.step()
        if neighbour.finish_reason == "error":
            assert not is_interrupt(exc) and "injected fault" in neighbour.error
        else:
            assert neighbour.generated == expected[1].tokens
    assert_clean(eng)

    errors = 0
    for i, (kind, value) in enumerate(outcomes):
        if kind == "completion":
            want = expected[i]
            if value.finish_reason == "error":
                errors += 1
                assert "injected fault" in value.error
            else:
                assert (value.tokens, value.text, value.finish_reason) == (want.tokens, want.text, want.finish_reason)
        elif kind == "text":
            assert value == expected[0].text
        else:
            errors += 1
            assert "injected fault" in value
    errors += neighbour is not None and neighbour.finish_reason == "error"
    if not persistent:
        assert errors <= 1, "one transient fault ended more than one request"
    # the same engine serves the next call as a fresh one would
    again = eng.generate(requests, max_new_tokens=MAX_NEW)
    assert [(c.tokens, c.text, c.finish_reason) for c in again] == [(c.tokens, c.text, c.finish_reason)
                                                                    for c in expected]
    assert_clean(eng)


def test_a_seed_past_64_bits_neither_raises_nor_poisons(model, tok, requests, expected):
    """Once, seed=2**70 raised inside the step and every later request failed with IndexError."""
    eng = new_engine(model, tok)
    a = eng.generate(requests[1], max_new_tokens=MAX_NEW, temperature=0.8, seed=2**70)
    b = new_engine(model, tok).generate(requests[1], max_new_tokens=MAX_NEW, temperature=0.8, seed=2**70)
    assert a.tokens == b.tokens and a.finish_reason == "length"
    assert [c.tokens for c in eng.generate(requests, max_new_tokens=MAX_NEW)] == [c.tokens for c in expected]
    assert_clean(eng)


def test_interrupt_during_decode_requeues_the_others_and_frees_its_own(model, tok, requests, expected):
    """Ctrl-C in the middle of one caller's decode: its request is aborted, another caller's
    request goes back to waiting with no blocks and then finishes exactly as it would have."""
    eng = new_engine(model, tok)
    other = eng.add_request(requests[0], pf.SamplingParams(max_new_tokens=MAX_NEW))
    fault = Fault(lambda: KeyboardInterrupt(), at=2, persistent=False)
    with fault.on(eng.decode_runner, "step"), pytest.raises(KeyboardInterrupt):
        eng.generate(requests[1], max_new_tokens=MAX_NEW)
    assert (eng.usage().used_blocks, eng.usage().running) == (0, 0)
    assert list(eng.scheduler.waiting) == [other] and not other.finished and len(other.generated) == 2
    while not other.finished:
        eng.step()
    assert other.generated == expected[0].tokens
    assert_clean(eng)


def test_a_batch_fault_that_follows_one_request_ends_only_that_one(model, tok, requests, expected):
    """A fault tied to one request's data (here: its image) fails it alone; its batch-mates,
    prefilled in the same step, complete in the same call."""
    eng = new_engine(model, tok)
    original = eng.model.encode_images

    def vit_that_breaks_on_images(images):
        if images:
            raise RuntimeError("injected fault: this image breaks the ViT")
        return original(images)

    with patch.object(eng.model, "encode_images", vit_that_breaks_on_images):
        out = eng.generate([requests[1], requests[0], requests[1]], max_new_tokens=MAX_NEW)
    assert [c.finish_reason for c in out] == ["length", "error", "length"]
    assert out[1].error == "request 1: prefill failed: RuntimeError: injected fault: this image breaks the ViT"
    assert out[0].tokens == out[2].tokens == expected[1].tokens
    assert_clean(eng)


def test_abort_is_idempotent_and_frees_waiting_and_running_requests(model, tok, requests):
    eng = new_engine(model, tok, max_batch_size=1)
    running = eng.add_request(requests[0], pf.SamplingParams(max_new_tokens=MAX_NEW))
    waiting = eng.add_request(requests[1], pf.SamplingParams(max_new_tokens=MAX_NEW))
    eng.step()
    assert running in eng.scheduler.running and waiting in eng.scheduler.waiting
    for seq in (running, waiting, running, waiting):
        eng.abort(seq)
    assert running.finish_reason == waiting.finish_reason == "abort"
    eng.step()  # an aborted waiting request is never admitted
    assert not waiting.generated and len(running.generated) == 2
    assert running.finish_reason == waiting.finish_reason == "abort" and running.error is waiting.error is None
    assert_clean(eng)
