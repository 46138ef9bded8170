"""The engine against full recomputation: paged cache, continuous batching and the decode runner
(eager on the CPU, through the same static buffers the CUDA graphs use) change nothing."""
import numpy as np
import pytest
import torch
from PIL import Image

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded
from tests.support.recompute import greedy_by_recompute


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return pf.load_model(tiny_dir, device="cpu", dtype=torch.float32, backend="reference", progress=False)


def picture(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def chat(text, *images):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
             + [{"type": "text", "text": text}]}]


def engine(model, **limits):
    return pf.Engine.from_model(model, **({"num_blocks": 128, "block_size": 16, "progress": False} | limits))


@pytest.mark.parametrize("images", [(), (picture(70, 40, 0),), (picture(30, 90, 1), picture(64, 64, 2))])
def test_greedy_equals_full_recompute(model, images):
    eng = engine(model)
    messages = chat("Describe what you see, please.", *images)
    enc = eng.tokenizer.encode(messages)
    got = eng.generate(messages, max_new_tokens=45)
    expected = greedy_by_recompute(model, enc.tokens, enc.images, 45, stop_ids=(eng.tokenizer.eos_id,))
    assert got.tokens == expected
    assert len(got.tokens) == 45 and got.finish_reason == "length"
    assert got.prompt_tokens == len(enc.tokens)
    assert eng.usage().used_blocks == 0


def three_requests():
    return [chat("First: what is it?", picture(70, 40, 3)),
            chat("A second, rather longer prompt about two pictures side by side.", picture(40, 40, 4),
                 picture(100, 20, 5)),
            chat("Third, text only.")]


def test_batched_and_staggered_equal_alone(model):
    alone = [engine(model).generate(r, max_new_tokens=20).tokens for r in three_requests()]

    together = engine(model).generate(three_requests(), max_new_tokens=20)
    assert [c.tokens for c in together] == alone

    eng = engine(model, max_batch_size=3)
    params = lambda: pf.SamplingParams(max_new_tokens=20)  # noqa: E731
    reqs = three_requests()
    first = eng.add_request(reqs[0], params())
    for _ in range(5):
        eng.step()
    second = eng.add_request(reqs[1], params())
    for _ in range(3):
        eng.step()
    third = eng.add_request(reqs[2], params())
    while eng.has_unfinished():
        eng.step()
    assert [first.generated, second.generated, third.generated] == alone
    assert eng.usage().used_blocks == 0 and not eng.blocks.tables


def test_small_cache_waits_and_preempts_but_stays_exact(model):
    """A cache too small for all three at once: admission waits and decode preempts (recompute);
    the greedy tokens do not change."""
    alone = [engine(model).generate(r, max_new_tokens=30).tokens for r in three_requests()]
    eng = engine(model, num_blocks=9)  # 8 usable blocks of 16 tokens
    got = eng.generate(three_requests(), max_new_tokens=30)
    assert [c.tokens for c in got] == alone
    assert eng.scheduler.preemptions > 0
    assert eng.usage().used_blocks == 0


def test_request_that_never_fits_fails_alone(model):
    eng = engine(model, num_blocks=4)  # 48 tokens of room
    big = Encoded(tokens=[1, 3] + [1000] * 60 + [4], images=[])
    small = Encoded(tokens=[1, 3, 1001, 4], images=[])
    out = eng.generate([small, big, small], max_new_tokens=8)
    assert out[1].finish_reason == "error" and "can never run with this cache" in out[1].error
    assert out[0].tokens == out[2].tokens and len(out[0].tokens) == 8
    with pytest.raises(pf.RequestError, match="can never run"):
        eng.generate(big, max_new_tokens=2)


def test_growth_to_the_whole_cache_ends_with_length(model):
    eng = engine(model, num_blocks=3)  # 32 tokens of room
    seq = eng.add_request(Encoded(tokens=[1, 3, 1001, 4], images=[]),
                          pf.SamplingParams(max_new_tokens=100, stop_token_ids=(0,)))  # <unk>: never sampled here
    while eng.has_unfinished():
        eng.step()
    # 32 tokens cached, and the 33rd (sampled from them) has nowhere to go: kept, then it ends
    assert seq.finish_reason == "length" and seq.error is None
    assert len(seq.tokens) == 33 and eng.usage().used_blocks == 0


def test_prompts_longer_than_the_prefill_budget_still_run(model):
    """The budget caps what joins a prefill, never the first sequence: a long prompt, or one
    that grew before being preempted, must not wait forever."""
    alone = [engine(model).generate(Encoded(tokens=[1] + [1000 + i] * 17, images=[]), max_new_tokens=20).tokens
             for i in range(2)]
    eng = engine(model, num_blocks=5, max_prefill_tokens=20)  # preemption makes a 31-token prefill
    got = eng.generate([Encoded(tokens=[1] + [1000 + i] * 17, images=[]) for i in range(2)], max_new_tokens=20)
    assert [c.tokens for c in got] == alone


def test_prompt_longer_than_max_context(model):
    eng = engine(model, max_model_len=16)
    with pytest.raises(pf.RequestError, match="max_model_len is 16"):
        eng.generate(Encoded(tokens=[1] + [1000] * 20, images=[]))
    done = eng.generate(Encoded(tokens=[1, 1000, 1001], images=[]), max_new_tokens=50)
    assert done.finish_reason == "length" and done.prompt_tokens + len(done.tokens) == 16


def test_bad_requests_fail_with_a_message(model, tmp_path):
    eng = engine(model)
    with pytest.raises(pf.RequestError, match=r"image tokens at position 1 beyond the \[IMG\] blocks of the 0 images"):
        eng.generate(Encoded(tokens=[1, 10, 10, 4], images=[]))
    with pytest.raises(pf.RequestError, match=r"token ids must lie in \[0, 131072\); got 200000"):
        eng.generate(Encoded(tokens=[1, 200000], images=[]))
    with pytest.raises(ValueError, match="top_p"):
        eng.generate(chat("hi"), top_p=0.0)
    # in a batch, a bad request fails alone and the others are served
    out = eng.generate([chat("fine"), chat("broken", tmp_path / "missing.png"), chat("fine")], max_new_tokens=3)
    assert [c.finish_reason for c in out] == ["length", "error", "length"]
    assert out[1].error.startswith("request 1: ") and "no such image file" in out[1].error
    assert out[0].tokens == out[2].tokens
    assert not eng.has_unfinished() and eng.usage().used_blocks == 0


def test_one_conversation_or_a_batch():
    from mistral_common.protocol.instruct.messages import UserMessage

    from pixtral_fast.runtime.engine import is_batch

    assert not is_batch(chat("one conversation"))
    assert not is_batch([UserMessage(content="hi"), UserMessage(content="again")])
    assert is_batch([chat("a"), chat("b")]) and is_batch([Encoded(tokens=[1], images=[])])
    with pytest.raises(ValueError, match="mixes requests"):
        is_batch([chat("a"), {"role": "user", "content": "b"}])


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=25, temperature=0.9, top_p=0.95, top_k=50)
    a = engine(model).generate(chat("Tell me a story."), seed=1234, **kw)
    b = engine(model).generate([chat("Other request."), chat("Tell me a story.")], seed=1234, **kw)[1]
    c = engine(model).generate(chat("Tell me a story."), seed=99, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_stream_concatenates_to_text(model):
    eng = engine(model)
    pieces = list(eng.stream(chat("Say something."), max_new_tokens=30))
    whole = engine(model).generate(chat("Say something."), max_new_tokens=30)
    assert "".join(pieces) == whole.text and len(pieces) > 1


def test_closing_a_stream_ends_its_request(model):
    eng = engine(model)
    stream = eng.stream(chat("Say something long."), max_new_tokens=200)
    next(stream)
    assert eng.usage().used_blocks > 0
    stream.close()
    assert not eng.has_unfinished() and eng.usage().used_blocks == 0
