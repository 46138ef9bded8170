"""sample_rows (the prefill's host helper) and logprobs: log_softmax of the raw fp32 logits, the
chosen token's and the n most likely, read with the tokens and finite flags in one host read."""
import pytest
import torch

from pixtral_fast.runtime.sampling import (MAX_LOGPROBS, SamplingParams, StepOutput, pack_plain,
                                           pack_with_logprobs, read_step, sample, sample_rows)


def logits_with_clear_ranks(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random logits whose top-(MAX_LOGPROBS + 1) values are >= 1e-3 apart, so the order is no float tie."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    for r in range(rows):
        top = logits[r].topk(MAX_LOGPROBS + 1).indices
        logits[r, top] = 20 - 0.25 * torch.arange(MAX_LOGPROBS + 1, dtype=torch.float32)
    return logits


def check_logprobs(out: StepOutput, logits: torch.Tensor, params: list[SamplingParams]):
    expected = torch.log_softmax(logits.float().double(), dim=-1)  # the oracle, in fp64
    for i, (p, lp) in enumerate(zip(params, out.logprobs)):
        if p.logprobs is None:
            assert lp is None
            continue
        assert lp.token == out.tokens[i]
        assert lp.logprob == pytest.approx(expected[i, lp.token].item(), abs=1e-5)
        ids = expected[i].topk(p.logprobs).indices.tolist()
        assert [t for t, _ in lp.top] == ids
        assert [v for _, v in lp.top] == pytest.approx(expected[i, ids].tolist(), abs=1e-5)


def test_greedy_rows_with_and_without_logprobs():
    logits = logits_with_clear_ranks(4, 3000)
    params = [SamplingParams(logprobs=5), SamplingParams(), SamplingParams(logprobs=0),
              SamplingParams(logprobs=MAX_LOGPROBS)]
    out = sample_rows(logits, params, seeds=[1, 2, 3, 4], steps=[0, 0, 0, 0])
    assert out.tokens == logits.argmax(-1).tolist() and out.finite == [True] * 4
    check_logprobs(out, logits, params)
    assert out.logprobs[2].top == [] and len(out.logprobs[3].top) == MAX_LOGPROBS


def test_sampled_rows_report_the_raw_logprob_not_the_tempered_one():
    logits = logits_with_clear_ranks(3, 500, seed=1)
    params = [SamplingParams(temperature=2.5, top_k=10, seed=9, logprobs=3)] * 3
    out = sample_rows(logits, params, seeds=[9, 10, 11], steps=[4, 4, 4])
    check_logprobs(out, logits, params)
    tempered = torch.log_softmax(logits.double() / 2.5, -1)
    assert any(abs(lp.logprob - tempered[i, lp.token].item()) > 1e-2 for i, lp in enumerate(out.logprobs))


def test_bf16_logits_are_scored_in_fp32():
    logits = logits_with_clear_ranks(2, 800, seed=2).bfloat16()
    params = [SamplingParams(logprobs=4), SamplingParams(temperature=0.7, logprobs=2)]
    out = sample_rows(logits, params, seeds=[0, 1], steps=[0, 0])
    check_logprobs(out, logits, params)


def test_sample_rows_equals_sample_with_the_same_tensors():
    logits = torch.randn(3, 400)
    params = [SamplingParams(temperature=0.9, top_p=0.8, top_k=30), SamplingParams(),
              SamplingParams(temperature=1.3)]
    out = sample_rows(logits, params, seeds=[5, 6, 2**63 - 1], steps=[3, 0, 8])
    col = lambda vals, dt: torch.tensor(vals, dtype=dt)  # noqa: E731
    tokens, _ = sample(logits, col([0.9, 0.0, 1.3], torch.float32), col([30, 0, 0], torch.int64),
                       col([0.8, 1.0, 1.0], torch.float32), col([5, 6, 2**63 - 1], torch.int64),
                       col([3, 0, 8], torch.int64))
    assert out.tokens == tokens.tolist() and out.logprobs == [None] * 3


def test_non_finite_rows_are_flagged():
    logits = torch.randn(3, 100)
    logits[0, 7] = float("nan")
    logits[2] = float("-inf")
    for params in ([SamplingParams()] * 3, [SamplingParams(temperature=1.0, logprobs=2)] * 3):
        out = sample_rows(logits, params, seeds=[0, 1, 2], steps=[0, 0, 0])
        assert out.finite == [False, True, False]
        assert 0 <= min(out.tokens) and max(out.tokens) < 100


def test_one_host_read_either_way():
    """The packed forms carry everything read_step returns, so a step reads one tensor."""
    logits = logits_with_clear_ranks(2, 300)
    tokens, finite = logits.argmax(-1), torch.isfinite(logits).all(-1)
    plain = pack_plain(tokens, finite)
    assert plain.dtype == torch.int64 and plain.shape == (2, 2)
    packed = pack_with_logprobs(logits, tokens, finite)
    assert packed.dtype == torch.float64 and packed.shape == (2, 3 + 2 * MAX_LOGPROBS)
    assert read_step(plain, [None, None]).tokens == read_step(packed, [1, None]).tokens == tokens.tolist()


def test_bad_arguments_name_what_is_wrong():
    logits = torch.randn(2, 50)
    with pytest.raises(ValueError, match="one row per params"):
        sample_rows(logits, [SamplingParams()], seeds=[0], steps=[0])
    with pytest.raises(ValueError, match="seeds"):
        sample_rows(logits, [SamplingParams()] * 2, seeds=[0], steps=[0, 0])
    with pytest.raises(ValueError, match="top_k"):
        sample_rows(logits, [SamplingParams(top_k=51)] * 2, seeds=[0, 0], steps=[0, 0])


def test_seeds_past_int64_sample_as_their_reduction():
    logits = torch.randn(2, 700)
    params = [SamplingParams(temperature=1.0)] * 2
    big = sample_rows(logits, params, seeds=[2**70 + 3, -(2**64) - 1], steps=[2, 2])
    assert big.tokens == sample_rows(logits, params, seeds=[3, -1], steps=[2, 2]).tokens
