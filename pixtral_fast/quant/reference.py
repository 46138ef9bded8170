"""Plain-PyTorch oracles of the quantized linears: dequantize, then matmul.

Like pixtral_fast.reference: computed in fp32 (fp64 when x is fp64) and returned in x.dtype, so
the same function is the test oracle (fed fp64 activations) and a readable baseline. The
dequantized weight q * scale is exact in fp64 (a 4-bit integer or an e4m3 value times a scale
with at most 24 significant bits).
"""
from __future__ import annotations

import torch

from pixtral_fast.quant.formats import unpack_int4


def _wide_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dequantize_w4a16(packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight_packed int32 [N, ceil(K/8)] + weight_scale [N, K/group_size] -> [N, K] in dtype."""
    q = unpack_int4(packed, in_features).to(dtype)
    per_column = scales.to(dtype).repeat_interleave(group_size, dim=1)[:, :in_features]
    return q * per_column


def dequantize_fp8(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3fn [N, K] + weight_scale [N, 1] / [N] (per channel) or [1] / [] (per tensor)."""
    s = scales.to(dtype)
    s = s.reshape(-1, 1) if s.numel() == weight.shape[0] and s.numel() > 1 else s.reshape(1, 1)
    return weight.to(dtype) * s


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] @ dequant(packed, scales).T -> [..., N] in x.dtype."""
    wide = _wide_dtype(x)
    w = dequantize_w4a16(packed, scales, group_size, x.shape[-1], wide)
    return (x.to(wide) @ w.t()).to(x.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (weight * scales).T -> [..., N] in x.dtype (weight-only FP8)."""
    wide = _wide_dtype(x)
    return (x.to(wide) @ dequantize_fp8(weight, scales, wide).t()).to(x.dtype)


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """What compressed-tensors' dynamic per-token FP8 activation scheme does to a linear's input:
    scale = max|x_row| / 448 (in x.dtype), x / scale rounded to e4m3, times scale, in x.dtype.
    A checkpoint with that scheme computes linear(fake_quant(x)), so the quantized model's oracle
    needs it; our kernels read x unquantized unless told otherwise."""
    from pixtral_fast.quant.formats import FP8_DTYPE, FP8_MAX

    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(x / safe, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.to(x.dtype) * safe).to(x.dtype)
