"""Sampling on the device: greedy, temperature, top-k, top-p, seeded noise, finite flags.

The noise is counter-based, so every draw here is deterministic; the statistical checks are still
sound: each uses independent (seed, step) streams and a bound that a correct sampler misses with
probability < 1e-6 (support sets) or at a chi-square significance level of 1e-4 (frequencies),
while the bugs they guard against (a top-k keeping k-1, a top-p dropping the crossing token, a
temperature ignored or applied after the cut) move them by orders of magnitude."""
import pytest
import torch

from pixtral_fast.runtime.sampling import sample, uniform_noise

N_DRAWS = 20000


def params(b, temperature=1.0, top_k=0, top_p=1.0, seed=0, step=0):
    full = lambda v, dt: torch.full((b,), v, dtype=dt)  # noqa: E731
    return dict(temperature=full(temperature, torch.float32), top_k=full(top_k, torch.int64),
                top_p=full(top_p, torch.float32), seed=torch.arange(b, dtype=torch.int64) + seed,
                step=full(step, torch.int64))


def draw(logits_row: torch.Tensor, n: int = N_DRAWS, **kw) -> torch.Tensor:
    """n independent draws from one row of logits (one noise stream per draw)."""
    tokens, finite = sample(logits_row.repeat(n, 1), **params(n, **kw))
    assert finite.all()
    return tokens


# Distinct logits 0.4 apart (no two probabilities within float noise of each other), in shuffled
# token order so that the sorted order is not the id order (a bug that confuses rank and id shows).
SPACED = torch.tensor([0.4 * i for i in range(12)]).flip(0)
SPACED = SPACED[torch.randperm(12, generator=torch.Generator().manual_seed(3))]


def ranked(logits: torch.Tensor, temperature: float):
    """Token ids by descending probability under temperature, and those probabilities (fp64)."""
    probs = (logits.double() / temperature).softmax(-1)
    p, order = probs.sort(descending=True)
    return order.tolist(), p


def assert_support(tokens: torch.Tensor, expected: list[int], probs_kept: torch.Tensor):
    # every kept token must show up: with renormalised probability >= q it is missed in N draws
    # with probability (1 - q)^N, which the assertion below bounds by 1e-6
    q = (probs_kept / probs_kept.sum()).min().item()
    assert (1 - q) ** len(tokens) < 1e-6, "the test needs more draws for this support"
    assert set(tokens.unique().tolist()) == set(expected)


def test_noise_is_uniform_and_deterministic():
    seeds, steps = torch.tensor([0, 1, 2**40]), torch.tensor([0, 5, 7])
    u = uniform_noise(seeds, steps, 50000)
    assert torch.equal(u, uniform_noise(seeds, steps, 50000))
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], uniform_noise(seeds, steps + 1, 50000)[0])


def test_greedy_rows_take_argmax():
    logits = torch.randn(4, 1000)
    p = params(4, temperature=0.0)
    assert torch.equal(sample(logits, **p)[0], logits.argmax(-1))
    assert torch.equal(sample(logits, **p, greedy_only=True)[0], logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 500)
    assert torch.equal(sample(logits, **params(6, top_k=1))[0], logits.argmax(-1))
    assert torch.equal(sample(logits, **params(6, top_p=1e-6))[0], logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_keeps_exactly_the_k_most_likely(k, temperature):
    order, probs = ranked(SPACED, temperature)
    tokens = draw(SPACED, temperature=temperature, top_k=k)
    assert_support(tokens, order[:k], probs[:k])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])  # how far into the crossing token's mass top_p lies
def test_top_p_keeps_the_token_that_crosses_p(m, where, temperature):
    """top_p inside the m-th token's share of the cumulative mass keeps exactly the first m: the
    smallest set whose mass reaches top_p. top_p sits >= 10% of a probability away from every
    cumulative sum, far from float ties."""
    order, probs = ranked(SPACED, temperature)
    before = probs[: m - 1].sum().item()
    top_p = before + where * probs[m - 1].item()
    tokens = draw(SPACED, temperature=temperature, top_p=top_p)
    assert_support(tokens, order[:m], probs[:m])


def test_top_k_and_top_p_together_keep_the_smaller_set():
    order, probs = ranked(SPACED, 1.0)
    top_p = probs[:4].sum().item() - 0.5 * probs[3].item()  # top_p alone keeps 4
    assert_support(draw(SPACED, top_k=3, top_p=top_p), order[:3], probs[:3])
    assert_support(draw(SPACED, top_k=6, top_p=top_p), order[:4], probs[:4])


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= statistic) for X ~ chi-square(len - 1): the regularised upper incomplete gamma."""
    n = counts.sum().double()
    expected = n * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    dof = len(probs) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def test_chi_square_helper_rejects_a_wrong_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert chi_square_p_value(torch.tensor([5000, 3000, 2000]), probs) > 0.99
    assert chi_square_p_value(torch.tensor([5300, 2800, 1900]), probs) < 1e-4


@pytest.mark.parametrize("temperature", [0.4, 0.7, 1.0, 1.6, 3.0])
def test_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -0.3])
    tokens = draw(logits, temperature=temperature, seed=1000 * int(10 * temperature))
    counts = torch.bincount(tokens, minlength=len(logits))
    expected = (logits.double() / temperature).softmax(-1)
    assert chi_square_p_value(counts, expected) > 1e-4
    if temperature != 1.0:  # the frequencies tell this temperature apart from T = 1
        assert chi_square_p_value(counts, logits.double().softmax(-1)) < 1e-6


@pytest.mark.parametrize("temperature", [0.6, 1.8])
def test_truncated_frequencies_are_the_renormalised_softmax(temperature):
    """Top-k/top-p cut the distribution after temperature; the kept tokens keep their ratios."""
    order, probs = ranked(SPACED, temperature)
    for kw, m in ((dict(top_k=4), 4), (dict(top_p=probs[:3].sum().item() - 0.4 * probs[2].item()), 3)):
        tokens = draw(SPACED, temperature=temperature, seed=77, **kw)
        counts = torch.bincount(tokens, minlength=12)[order[:m]]
        assert counts.sum() == N_DRAWS
        assert chi_square_p_value(counts, probs[:m] / probs[:m].sum()) > 1e-4


def test_temperature_zero_row_next_to_sampled_rows():
    logits = torch.randn(3, 100)
    p = params(3)
    p["temperature"][1] = 0.0
    assert sample(logits, **p)[0][1] == logits[1].argmax()


def test_a_row_samples_the_same_alone_or_in_a_batch():
    logits = torch.randn(5, 300)
    p = params(5, temperature=0.8, top_k=50, top_p=0.9, seed=123, step=7)
    batched = sample(logits, **p)[0]
    for i in range(5):
        alone = sample(logits[i:i + 1], **{k: v[i:i + 1] for k, v in p.items()})[0]
        assert alone.item() == batched[i].item()


@pytest.mark.parametrize("greedy_only", [True, False])
def test_finite_flag_marks_rows_with_nan_or_inf(greedy_only):
    logits = torch.randn(5, 64)
    logits[1, 3] = float("nan")
    logits[2, 10] = float("inf")
    logits[3, 0] = float("-inf")
    _, finite = sample(logits, **params(5, temperature=0.0 if greedy_only else 0.9), greedy_only=greedy_only)
    assert finite.tolist() == [True, False, False, False, True]


def test_seed_bits_all_matter():
    """Seeds anywhere in the int64 range (the engine reduces any int into it) give distinct streams."""
    logits = torch.zeros(1, 4096)
    seeds = [0, 1, -1, 2**62, -(2**63), 2**63 - 1]
    got = [sample(logits, **{**params(1), "seed": torch.tensor([s])})[0].item() for s in seeds]
    assert len(set(got)) == len(seeds)
