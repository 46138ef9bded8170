"""The RoPE frequency table that the kernels and the oracle (pixtral_fast.reference) share, so that
their angles are bit-identical. Plain PyTorch on the CPU: no @triton.jit here."""
from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/head_dim) for i = 0 .. head_dim/2 - 1, as fp32. Computed in fp64 on the CPU,
    then rounded once and moved: a GPU's pow is not correctly rounded, and one ulp of f[i] moves
    the angle pos * f[i] by up to 1e-2 rad at position 131071 (the decoder's theta is 1e9)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / (float(theta) ** exponent)).to(torch.float32).to(device)
