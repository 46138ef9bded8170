"""Sampling on the device, with no host sync, so that it lives inside the captured decode graph.

Per-row parameters come in tensors (temperature, top_k, top_p, seed, step). Randomness is a
counter-based hash of (seed, step, token id) turned into Gumbel noise: the same seed gives the same
tokens on any device, in any batch, captured or eager — no generator state to carry."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 torch stores it (torch multiplies int64 with wraparound)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_K1, _K2, _K3 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(0, 1) uniforms [B, vocab] from a splitmix64-style mix of (seed, step, token id)."""
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    x = seed[:, None] * _K1 + step[:, None] * _K3 + ids[None, :] * _K2
    x = (x ^ _shr(x, 30)) * _K2
    x = (x ^ _shr(x, 27)) * _K3
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, step: torch.Tensor, greedy_only: bool = False) -> torch.Tensor:
    """Next token per row of logits [B, V] (fp32). Rows with temperature 0 take the argmax.
    greedy_only: the caller knows every row is greedy and skips the sort."""
    best = logits.argmax(dim=-1)
    if greedy_only:
        return best
    vocab = logits.shape[-1]
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    rank = torch.arange(vocab, device=logits.device)[None, :]
    keep = (mass_before < top_p[:, None]) & ((top_k[:, None] == 0) | (rank < top_k[:, None]))
    keep[:, 0] = True
    gumbel = -torch.log(-torch.log(uniform_noise(seed, step, vocab).gather(1, order)))
    choice = torch.where(keep, sorted_logits + gumbel, float("-inf")).argmax(dim=-1)
    sampled = order.gather(1, choice[:, None])[:, 0]
    return torch.where(temperature > 0, sampled, best)
