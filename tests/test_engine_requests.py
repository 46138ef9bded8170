"""What one request can do to the engine: bad sampling parameters are refused before admission;
a request the tokenizer rejects fails alone in its batch; non-finite logits end a request with an
error saying so; logprobs are recorded; a preempted request that generated an [IMG] token is
re-prefilled with image features at its prompt's [IMG] positions only."""
import math
from unittest.mock import patch

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.model.text import AttentionMetadata
from tests.support.engines import assert_clean, load_tiny, model, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.test_engine import chat, picture
from tests.tolerances import MODEL_FP32_ATOL

VOCAB = 131072


# -- parameters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, name", [
    (dict(top_k=VOCAB + 1), "top_k"), (dict(temperature=math.nan), "temperature"), (dict(top_p=math.inf), "top_p"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(seed=1.5), "seed"), (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_parameters_are_refused_before_admission(model, tok, bad, name):
    eng = new_engine(model, tok)
    request = tok.encode(chat("hi"))
    with pytest.raises(ValueError, match=name):
        eng.generate([request, request], **bad)
    with pytest.raises(ValueError, match=name):
        eng.stream(request, **bad)  # at the call, not at the first next()
    assert_clean(eng)


@pytest.mark.parametrize("params, name", [(dict(stop_token_ids=(VOCAB,)), "stop_token_ids"),
                                          (dict(top_k=VOCAB + 5), "top_k")])
def test_add_request_checks_parameters_against_the_vocabulary(model, tok, params, name):
    eng = new_engine(model, tok)
    with pytest.raises(ValueError, match=name):
        eng.add_request(tok.encode(chat("hi")), pf.SamplingParams(**params))
    assert_clean(eng)


# -- requests the tokenizer rejects ----------------------------------------------------------------

UNTOKENIZABLE = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],   # assistant last
    [{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "what?"}]}],  # no url
    [{"role": "user", "content": [{"type": "text"}]}],                                # a text part without text
    [{"role": "user"}],                                                               # no content at all
]


def test_requests_the_tokenizer_rejects_fail_alone(model, tok):
    eng = new_engine(model, tok)
    good = chat("A fine request.")
    alone = new_engine(model, tok).generate(good, max_new_tokens=3)
    out = eng.generate([good, *UNTOKENIZABLE, good], max_new_tokens=3)
    assert [c.finish_reason for c in out] == ["length"] + ["error"] * len(UNTOKENIZABLE) + ["length"]
    for i, c in enumerate(out[1:-1], start=1):
        assert c.error.startswith(f"request {i}: ") and len(c.error) > len(f"request {i}: ") + 10
    assert out[0].tokens == out[-1].tokens == alone.tokens
    assert_clean(eng)
    for bad in UNTOKENIZABLE:
        with pytest.raises(pf.RequestError):
            eng.generate(bad, max_new_tokens=3)
        with pytest.raises(pf.RequestError):
            list(eng.stream(bad, max_new_tokens=3))
    assert_clean(eng)


# -- non-finite logits -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_end_the_request_with_an_error(model, tok, value):
    eng = new_engine(model, tok)
    request = tok.encode(chat("hi"))
    saved = model.output.weight[7].clone()
    try:
        with torch.no_grad():
            model.output.weight[7] = value
        with pytest.raises(pf.RequestError, match=r"logits were not finite \(NaN/inf\) at new token 0"):
            eng.generate(request, max_new_tokens=20)
        out = eng.generate([request], max_new_tokens=20, temperature=0.7, seed=1)
        assert out[0].finish_reason == "error" and out[0].tokens == [] and "NaN/inf" in out[0].error
    finally:
        with torch.no_grad():
            model.output.weight[7] = saved
    assert_clean(eng)
    assert eng.generate(request, max_new_tokens=3).finish_reason == "length"


def test_non_finite_logits_in_decode_end_only_that_row(model, tok):
    """NaN in row 0 of the second decode step: request 0 ends with an error after the two
    tokens it had, and request 1, in the same batch, completes unchanged."""
    requests = [tok.encode(chat("What is it?", picture(40, 24, 0))), tok.encode(chat("Text only."))]
    expected = new_engine(model, tok).generate(requests, max_new_tokens=5)
    eng = new_engine(model, tok)
    original, calls = model.logits, []

    def logits_with_a_nan(h):
        out = original(h)
        calls.append(len(out))
        if len(calls) == 3:  # prefill, decode 1, decode 2
            out[0, 123] = math.nan
        return out

    with patch.object(model, "logits", logits_with_a_nan):
        out = eng.generate(requests, max_new_tokens=5)
    assert calls[:3] == [2, 2, 2]
    assert out[0].finish_reason == "error" and "not finite (NaN/inf) at new token 2" in out[0].error
    assert out[0].tokens == expected[0].tokens[:2]
    assert (out[1].tokens, out[1].finish_reason) == (expected[1].tokens, "length")
    assert_clean(eng)


# -- logprobs --------------------------------------------------------------------------------------

def test_logprobs_are_recorded_per_generated_token(model, tok):
    eng = new_engine(model, tok)
    request = tok.encode(chat("What is it?", picture(40, 24, 0)))
    greedy = eng.add_request(request, pf.SamplingParams(max_new_tokens=4, logprobs=3))
    sampled = eng.add_request(request, pf.SamplingParams(max_new_tokens=4, temperature=1.0, seed=5, logprobs=0))
    plain = eng.add_request(request, pf.SamplingParams(max_new_tokens=4))
    while eng.has_unfinished():
        eng.step()
    assert plain.logprobs == [] and len(plain.generated) == 4
    for seq, n in ((greedy, 3), (sampled, 0)):
        assert len(seq.logprobs) == len(seq.generated) == 4
        for i, (token, lp) in enumerate(zip(seq.generated, seq.logprobs)):
            ref = model(torch.tensor(seq.tokens[: len(seq.prompt) + i]), request.images)[-1].log_softmax(-1).double()
            assert lp.token == token
            assert abs(lp.logprob - ref[token].item()) <= MODEL_FP32_ATOL
            values, ids = ref.topk(n)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert all(abs(v - r) <= MODEL_FP32_ATOL for (_, v), r in zip(lp.top, values.tolist()))
    assert_clean(eng)


# -- a generated [IMG] across a preemption ---------------------------------------------------------

def greedy_with_prompt_images(model, prompt, images, n, stop_ids):
    """The oracle: full recompute at every step, image features at the prompt's [IMG] positions
    only (a generated [IMG] keeps its token embedding, as it had when it was decoded)."""
    img = model.args.vision.image_token_id
    rows = torch.tensor([i for i, t in enumerate(prompt) if t == img])
    features = model.encode_images(images)
    tokens, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            h = model.tok_embeddings(torch.tensor(tokens))
            h[rows] = features
            h = model.run_decoder(h, AttentionMetadata.for_sequences([len(tokens)], "cpu"))
            nxt = int(model.logits(h[-1:])[0].argmax())
            out.append(nxt)
            tokens.append(nxt)
            if nxt in stop_ids:
                break
    return out


def test_a_generated_image_token_survives_preemption(tiny_dir, tok):
    model = load_tiny(tiny_dir)  # its own copy: the output layer is changed below
    img = model.args.vision.image_token_id
    requests = [tok.encode(chat("What is it?", picture(40, 24, 0))), tok.encode(chat("Why?", picture(24, 40, 1)))]
    stops = (tok.eos_id,)
    # Make [IMG] the model's second answer to request 1: its output row outscores that token's.
    second = greedy_with_prompt_images(model, requests[1].tokens, requests[1].images, 2, stops)[1]
    with torch.no_grad():
        model.output.weight[img] = 3 * model.output.weight[second]
    expected = [greedy_with_prompt_images(model, r.tokens, r.images, 20, stops) for r in requests]
    assert img in expected[1][:3], "set-up: request 1 must generate an [IMG] early"

    reprefilled = []
    eng = pf.Engine.from_model(model, tok, num_blocks=5, block_size=16, progress=False)  # 4 usable blocks
    original = eng.executor.prefill

    def watching_prefill(batch, *args, **kwargs):
        ends = [sum(batch.lengths[: k + 1]) for k in range(len(batch.lengths))]
        for packed, steps in zip(batch.logit_rows, batch.steps):  # each sequence's tokens end with what it generated
            generated = batch.tokens[ends[packed] - steps: ends[packed]] if steps else []
            reprefilled.extend([packed] if img in generated else [])
        return original(batch, *args, **kwargs)

    with patch.object(eng.executor, "prefill", watching_prefill):
        out = eng.generate(requests, max_new_tokens=20)
    assert reprefilled, "set-up: the request that generated [IMG] was never preempted and re-prefilled"
    assert [c.tokens for c in out] == expected
    assert_clean(eng)


# -- engine limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("limits, name", [
    (dict(block_size=24), "block_size"), (dict(block_size=True), "block_size"), (dict(num_blocks=0), "num_blocks"),
    (dict(num_blocks=2.5), "num_blocks"), (dict(memory_bytes=-1), "memory_bytes"),
    (dict(max_batch_size=True), "max_batch_size"), (dict(max_batch_size=0), "max_batch_size"),
    (dict(max_model_len="4096"), "max_model_len"), (dict(max_prefill_tokens=0), "max_prefill_tokens"),
    (dict(gpu_memory_fraction=math.nan), "gpu_memory_fraction"), (dict(gpu_memory_fraction=1.5), "gpu_memory_fraction"),
    (dict(graph_buckets=(1, 0)), "graph_buckets"), (dict(graph_buckets=8), "graph_buckets"),
    (dict(use_cuda_graphs="yes"), "use_cuda_graphs"), (dict(progress=1), "progress"),
])
def test_engine_limits_are_checked(limits, name):
    from pixtral_fast.runtime.config import EngineConfig

    with pytest.raises(ValueError, match=name):
        EngineConfig(**limits)
    EngineConfig(num_blocks=8, max_model_len=64, graph_buckets=[1, 2], use_cuda_graphs=None, progress=False)
