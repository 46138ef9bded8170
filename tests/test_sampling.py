"""Sampling on the device: greedy, temperature, top-k, top-p and seeded noise."""
import torch

from pixtral_fast.runtime.sampling import sample, uniform_noise


def params(b, temperature=1.0, top_k=0, top_p=1.0, seed=0, step=0):
    full = lambda v, dt: torch.full((b,), v, dtype=dt)  # noqa: E731
    return dict(temperature=full(temperature, torch.float32), top_k=full(top_k, torch.int64),
                top_p=full(top_p, torch.float32), seed=torch.arange(b, dtype=torch.int64) + seed,
                step=full(step, torch.int64))


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
    assert torch.equal(sample(logits, **p), logits.argmax(-1))
    assert torch.equal(sample(logits, **p, greedy_only=True), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 500)
    assert torch.equal(sample(logits, **params(6, top_k=1)), logits.argmax(-1))
    assert torch.equal(sample(logits, **params(6, top_p=1e-6)), logits.argmax(-1))


def test_frequencies_follow_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(20000, 1)
    draws = sample(logits, **params(20000, temperature=1.0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.015


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0]).repeat(5000, 1)
    assert sample(logits, **params(5000, top_k=2)).max() <= 1
    probs = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...: top_p 0.8 keeps the first two
    assert probs[:1].sum() < 0.8 < probs[:2].sum()
    assert sample(logits, **params(5000, top_p=0.8)).max() <= 1
    assert sample(logits, **params(5000, temperature=5.0)).max() == 4  # hot: the tail shows up


def test_temperature_zero_row_next_to_sampled_rows():
    logits = torch.randn(3, 100)
    p = params(3)
    p["temperature"][1] = 0.0
    assert sample(logits, **p)[1] == logits[1].argmax()
