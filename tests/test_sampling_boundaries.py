"""Sampling at its exact boundaries: top-p where the cumulative mass equals p (masses exact in
fp32: 2, 4 or 8 equal logits and one far below, whose probability underflows to exactly 0), one
float step either side of it, and the row check that flags logits with NaN/inf or no spread at
all (what an overflowed hidden state gives).

The rule (SamplingParams): the smallest set of most likely tokens whose mass reaches top_p is
kept; a token whose preceding mass equals top_p exactly is not kept; equal logits rank by id."""
import pytest
import torch

from pixtral_fast.runtime.sampling import SamplingParams, sample, sample_rows, usable_rows

SEEDS = 256  # draws per case: with two or more equally likely kept tokens, all show up (miss < 2**-200)


def fp32_step(p: float, toward: float) -> float:
    """The float32 next to p toward `toward`: the device holds top_p in fp32."""
    return float(torch.nextafter(torch.tensor(p), torch.tensor(toward)))


def exact_row(equal: int) -> torch.Tensor:
    """`equal` zero logits, then one at -1000: probabilities 1/equal exactly and 0 (exp underflows),
    and a row with some spread (an all-equal row is refused as degenerate)."""
    return torch.tensor([0.0] * equal + [-1000.0])


def draws(equal: int, top_p: float, temperature: float = 1.0, top_k: int = 0) -> set[int]:
    """The tokens drawn from exact_row(equal) over SEEDS independent noise streams."""
    full = lambda v, dt: torch.full((SEEDS,), v, dtype=dt)  # noqa: E731
    logits = exact_row(equal).repeat(SEEDS, 1)
    tokens, usable = sample(logits, full(temperature, torch.float32), full(top_k, torch.int64),
                            full(top_p, torch.float32), torch.arange(SEEDS, dtype=torch.int64),
                            full(0, torch.int64))
    assert usable.all()
    return set(tokens.tolist())


def test_two_equal_logits_at_top_p_one_half_keep_only_the_first_for_every_seed():
    """[0, 0] with top_p 0.5: the first token's mass reaches 0.5, so it alone is kept; the second
    token's preceding mass is exactly 0.5 and it must not be kept (else the token is random)."""
    assert draws(2, 0.5) == {0}
    assert draws(2, 0.5, temperature=3.0) == {0}


@pytest.mark.parametrize("equal, top_p, kept", [
    (4, 0.25, 1), (4, 0.5, 2), (4, 0.75, 3), (4, 1.0, 4),
    (8, 0.125, 1), (8, 0.375, 3), (8, 0.5, 4), (8, 0.875, 7),
    (2, 1.0, 2),
])
def test_top_p_equal_to_a_cumulative_mass_keeps_exactly_the_tokens_that_reach_it(equal, top_p, kept):
    assert draws(equal, top_p) == set(range(kept))


@pytest.mark.parametrize("equal, boundary", [(2, 0.5), (4, 0.25), (4, 0.5), (4, 0.75), (8, 0.375)])
def test_one_float_step_either_side_of_a_cumulative_mass(equal, boundary):
    """Just below the boundary the same tokens are kept as at it; just above, the token that
    crosses top_p joins them."""
    kept = round(boundary * equal)
    below, above = (fp32_step(boundary, toward) for toward in (0.0, 1.0))
    assert draws(equal, below) == set(range(kept))
    assert draws(equal, boundary) == set(range(kept))
    assert draws(equal, above) == set(range(kept + 1))


def test_equal_logits_cut_by_top_k_keep_the_lower_ids():
    assert draws(4, 1.0, top_k=1) == {0}
    assert draws(8, 1.0, top_k=3) == {0, 1, 2}


def test_sample_rows_takes_the_same_boundary():
    """The prefill path (host parameters) meets the same rule as the decode path."""
    params = [SamplingParams(temperature=1.0, top_p=0.5)] * SEEDS
    out = sample_rows(exact_row(2).repeat(SEEDS, 1), params, seeds=list(range(SEEDS)), steps=[0] * SEEDS)
    assert set(out.tokens) == {0} and all(out.finite)


# -- the row check ---------------------------------------------------------------------------------

def rows_with(vocab: int, *edits) -> torch.Tensor:
    """Random rows, one per edit; an edit (index, value) sets one logit, (None, value) the whole row."""
    rows = torch.randn(len(edits), vocab, generator=torch.Generator().manual_seed(vocab))
    for i, (index, value) in enumerate(edits):
        if value is None:
            continue
        if index is None:
            rows[i] = value
        else:
            rows[i, index] = value
    return rows


@pytest.mark.parametrize("vocab", [2, 3, 17, 4096, 131072])
def test_usable_rows_flags_non_finite_and_all_equal_rows(vocab):
    nan, inf = float("nan"), float("inf")
    edits = [(None, None), (0, nan), (vocab - 1, inf), (vocab // 2, -inf), (0, inf), (vocab - 1, -inf),
             (None, 0.0), (None, inf), (None, -inf), (0, 1e30)]
    want = [True, False, False, False, False, False, False, False, False, True]
    assert usable_rows(rows_with(vocab, *edits)).tolist() == want


def test_an_all_zero_row_is_flagged_on_every_sampling_path():
    """Zero logits are what a hidden state that overflowed its RMSNorm gives: flagged whether the
    step is greedy only, samples, or asks for logprobs."""
    logits = torch.zeros(2, 64)
    logits[1, 5] = 1.0
    full = lambda v, dt: torch.full((2,), v, dtype=dt)  # noqa: E731
    args = (full(0.7, torch.float32), full(0, torch.int64), full(0.9, torch.float32), torch.arange(2),
            full(0, torch.int64))
    for greedy_only in (True, False):
        assert sample(logits, *args, greedy_only=greedy_only)[1].tolist() == [False, True]
    for params in ([SamplingParams()] * 2, [SamplingParams(temperature=1.0, logprobs=2)] * 2):
        assert sample_rows(logits, params, seeds=[0, 1], steps=[0, 0]).finite == [False, True]


def test_a_one_token_vocabulary_is_usable_when_finite():
    assert usable_rows(torch.tensor([[0.0], [float("nan")], [3.0]])).tolist() == [True, False, True]
