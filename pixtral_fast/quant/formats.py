"""The packed tensor formats of compressed-tensors, written from its on-disk layout, and the
round-to-nearest symmetric quantizers that produce them.

`pack-quantized`, 4 bits (W4A16): a weight [N, K] becomes
  weight_packed int32 [N, ceil(K / 8)]: element k of a row sits in word k // 8 at bits
      4 * (k % 8) .. 4 * (k % 8) + 3, stored unsigned as q + 8 (q in [-8, 7]); a short last
      word is padded with zero nibbles;
  weight_scale [N, K / group_size] in the model's float dtype (one column for the "channel"
      strategy, i.e. group_size = K);
  weight_shape int64 [2] = (N, K).
  The weight is q * scale (symmetric: no zero point). compressed-tensors computes the scale as
  max|w| / 7.5 per group (its range is [-8, 7], and it divides by half the range width).
`float-quantized`, 8 bits (FP8): weight float8_e4m3fn [N, K], weight_scale [N, 1] ("channel")
  or [1] ("tensor"); scale = max|w| / 448.

Nothing here dequantizes a checkpoint for inference: the kernels read these tensors as they are.
"""
from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7
INT4_OFFSET = 8  # stored nibble = q + 8
INT4_PER_WORD = 8
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def packed_words(k: int) -> int:
    """int32 words per row holding k 4-bit values."""
    return -(-k // INT4_PER_WORD)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [N, K] (any integer dtype) -> int32 [N, ceil(K/8)]."""
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"q must be a 2-D integer tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(f"q holds values outside [{INT4_MIN}, {INT4_MAX}]")
    n, k = q.shape
    words = packed_words(k)
    nibbles = torch.zeros((n, words * INT4_PER_WORD), dtype=torch.int64, device=q.device)
    nibbles[:, :k] = q.to(torch.int64) + INT4_OFFSET
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    packed = (nibbles.view(n, words, INT4_PER_WORD) << shifts).sum(dim=-1)  # < 2**32: no carries
    # Reinterpret the unsigned 32-bit value as int32 (two's complement), as the format stores it.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, ceil(k/8)] -> int8 [N, k] in [-8, 7]."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_words(k):
        raise ValueError(f"packed has {packed.shape[1]} words per row; {k} values need {packed_words(k)}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, then masked: sign-safe
    return (nibbles.flatten(1)[:, :k] - INT4_OFFSET).to(torch.int8)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError("weight must be a 2-D floating-point tensor [out_features, in_features]")


def quantize_w4a16(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype | None = None):
    """Round-to-nearest symmetric int4, one scale per `group_size` inputs of each output row.
    Returns (weight_packed int32 [N, K/8], weight_scale [N, K/group_size] in scale_dtype (default:
    weight.dtype), as compressed-tensors stores them). The rounding uses the stored (rounded)
    scale, so dequantizing gives the nearest representable weight for that scale."""
    _check_weight(weight)
    n, k = weight.shape
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must be a positive divisor of in_features {k}, got {group_size!r}")
    w = weight.detach().float().view(n, k // group_size, group_size)
    amax = w.abs().amax(dim=-1)
    scale = (amax / ((INT4_MAX - INT4_MIN) / 2)).to(scale_dtype or weight.dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = torch.clamp(torch.round(w / safe.unsqueeze(-1)), INT4_MIN, INT4_MAX).view(n, k)
    return pack_int4(q.to(torch.int8)), scale


def quantize_fp8(weight: torch.Tensor, per_channel: bool = True, scale_dtype: torch.dtype | None = None):
    """Round-to-nearest FP8 e4m3 with a symmetric scale per output channel ([N, 1]) or per
    tensor ([1]). Returns (weight float8_e4m3fn [N, K], weight_scale)."""
    _check_weight(weight)
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = (amax / FP8_MAX).to(scale_dtype or weight.dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = torch.clamp(w / (safe if per_channel else safe.reshape(1, 1)), -FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale


# ---------------------------------------------------------------------------------------------
# W4A16, the kernel's layout (repacked at load; nothing on disk changes)
#
# `k128`: the packed nibbles of each output row regrouped by blocks of 128 inputs, so that the
# kernel turns them into dot operands with one 3-input logic op (and a shift) per two weights
# (kernels/w4a16_linear.py): K is padded to a multiple of 128 (Kp) with the nibble 8 (q = 0), and
# within block b of a row, 16-bit halfword h (h = 0..31) holds the four inputs
# k = 128 b + 32 c + h at bits 4c..4c+3 (c = 0..3), stored as q + 8 like the on-disk format. As
# int32 words (little-endian: halfwords 2w and 2w + 1): [N, Kp / 8], the byte size of
# weight_packed for K a multiple of 128. The scales are transposed to [K / group_size, N] (one
# contiguous row per group), in their dtype.
K128_BLOCK = 128


def k128_layout_ok(group_size: int, k: int) -> bool:
    """Whether the k128 kernel takes this group size: a power of two >= 32, or one group per row
    (per channel, any K)."""
    return group_size == k or (group_size >= 32 and group_size & (group_size - 1) == 0)


def repack_w4a16_k128(packed: torch.Tensor, scales: torch.Tensor, group_size: int, k: int):
    """compressed-tensors (weight_packed [N, ceil(K/8)], weight_scale [N, K/group]) -> the k128
    layout (int32 [N, Kp/8], scales [K/group, N]). On the tensors' device; exact (a permutation)."""
    if not k128_layout_ok(group_size, k):
        raise ValueError(f"group_size {group_size} (in_features {k}): the k128 layout needs a power of two "
                         ">= 32 or one group per row")
    n = packed.shape[0]
    kp = -(-k // K128_BLOCK) * K128_BLOCK
    u = (unpack_int4(packed, k).to(torch.int32) + INT4_OFFSET)
    u = torch.nn.functional.pad(u, (0, kp - k), value=INT4_OFFSET).view(n, kp // K128_BLOCK, 4, 32)
    half = u[:, :, 0] | (u[:, :, 1] << 4) | (u[:, :, 2] << 8) | (u[:, :, 3] << 12)  # [N, Kp/128, 32] < 2**16
    words = half[..., 0::2] | (half[..., 1::2] << 16)  # halfword 2w low, 2w + 1 high: < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words) if words.dtype == torch.int64 else words
    return words.reshape(n, kp // 8).to(torch.int32).contiguous(), scales.t().contiguous()


def unrepack_w4a16_k128(packed_k128: torch.Tensor, scales_t: torch.Tensor, k: int):
    """The inverse of repack_w4a16_k128: (weight_packed [N, ceil(K/8)], weight_scale [N, K/group])."""
    n = packed_k128.shape[0]
    kp = packed_k128.shape[1] * 8
    words = packed_k128.to(torch.int64) & 0xFFFFFFFF
    half = torch.stack((words & 0xFFFF, words >> 16), dim=-1).view(n, kp // K128_BLOCK, 32)
    u = torch.stack([(half >> (4 * c)) & 0xF for c in range(4)], dim=2).view(n, kp)[:, :k]
    return pack_int4((u - INT4_OFFSET).to(torch.int8)), scales_t.t().contiguous()
