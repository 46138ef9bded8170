"""W4A16 linear, Triton: out = x @ dequant(packed, scales).T with the weights read packed.

Weights in compressed-tensors' `pack-quantized` layout (pixtral_fast/quant/formats.py): packed
int32 [N, ceil(K/8)], element k of row n in word k // 8, bits 4*(k % 8).., stored as q + 8;
scales [N, K / group_size]. Each K tile loads BLOCK_K / 8 words per output row (the packed
bytes, contiguous along K), splits them into nibbles with shifts (the 8 nibbles of a word become
8 consecutive k), and dequantizes in registers, q * scale in fp32 rounded once to the dot's
dtype (what compressed-tensors' own dequantization yields), then one tl.dot with fp32
accumulation. The scale of each k is gathered by k // group_size, so any group size works,
tiles need not align with groups, and K need not be a multiple of anything (masks).

Decode and prefill forms, split-K partials: see _quant_linear.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import _quant_linear as plan


# M (the batch rows) is not specialized: decode batches 1..32 would otherwise compile three
# variants per kernel (M == 1, M % 16 == 0, other); M only bounds masks.
@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_sg, group_size,
    k_per_split, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    words_per_row = (K + 7) // 8

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8) * 4
    m_ok = offs_m < M - row0
    n_ok = offs_n < N - col0

    x_rows = x_ptr + row0.to(tl.int64) * stride_xm + offs_m[:, None] * stride_xm
    # Words as [BLOCK_K / 8, BLOCK_N]: unpacked below to [BLOCK_K, BLOCK_N], the dot's B operand.
    w_cols = w_ptr + col0.to(tl.int64) * stride_wn + offs_n[None, :] * stride_wn
    s_cols = s_ptr + col0.to(tl.int64) * stride_sn + offs_n[None, :] * stride_sn
    dot_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        word_idx = k0 // 8 + offs_w
        words = tl.load(w_cols + word_idx[:, None], mask=(word_idx < words_per_row)[:, None] & n_ok[None, :],
                        other=0)
        # >> is arithmetic on int32; the & 0xF keeps only the nibble, so the sign bit is harmless.
        nibbles = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        q = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)) - 8
        group = (k0 + offs_k) // group_size
        scale = tl.load(s_cols + group[:, None] * stride_sg, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        w = (q.to(tl.float32) * scale.to(tl.float32)).to(dot_dtype)
        # ieee: fp32 activations stay fp32 (no TF32); fp16/bf16 are unaffected.
        acc = tl.dot(x, w, acc, input_precision="ieee")

    out_rows = out_ptr + pid_k.to(tl.int64) * stride_split + row0.to(tl.int64) * N
    out_ptrs = out_rows + offs_m[:, None] * N + col0 + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# configs and launcher


def configs(capability: int, dtype: torch.dtype) -> dict[str, dict]:
    """{"decode": ..., "prefill": ...} for this arch (90: Hopper; 80: Ampere and Ada) and dtype.
    Decode: 32 rows (the whole batch: the weights are streamed once), 64 columns, 128 k (64 B of
    packed weights per row and tile), 3 stages in flight to keep HBM busy, 8 warps (4 need ~255
    registers). Prefill: 128x128 (Hopper) / 128x64 (Ampere) tiles on 8 warps with BLOCK_K 32: the unpacked
    [BLOCK_K, BLOCK_N] weight tile lives in registers next to the accumulator, and BLOCK_K 64
    takes 255 registers. fp32 (IEEE dots on the FMA units): small tiles. All compile without
    spills, most with margin (tests/test_quant_compile.py prints the table)."""
    if dtype == torch.float32:
        return {"decode": plan.cfg(32, 64, 16, 8, 2), "prefill": plan.cfg(64, 64, 16, 8, 2)}
    if capability >= 90:
        return {"decode": plan.cfg(32, 64, 128, 8, 3), "prefill": plan.cfg(128, 128, 32, 8, 3)}
    return {"decode": plan.cfg(32, 64, 128, 8, 3), "prefill": plan.cfg(128, 64, 32, 8, 3)}


def w4a16_matmul(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                 split: int | None = None, config: dict | None = None) -> torch.Tensor:
    """x2d [M, K] (unit column stride) @ dequant(packed [N, ceil(K/8)], scales [N, K/group]).T
    -> [M, N] in x2d.dtype. Inputs are validated by pixtral_fast.ops. split / config (tests and
    benchmarks) override the K split and the tile config."""
    layout = (packed.stride(0), scales.stride(0), scales.stride(1), group_size)
    return plan.launch(_w4a16_kernel, x2d, packed, scales, packed.shape[0], layout, configs, split, config)


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] -> [..., N]; leading dimensions flattened without a copy."""
    return w4a16_matmul(plan.rows(x), packed, scales, group_size).view(*x.shape[:-1], packed.shape[0])


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs

_ALIGNED_ARGS = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn", "stride_sn")
_SCALE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_specs(capability: int) -> list[dict]:
    """Both forms per activation dtype, with scales in the activation dtype (what checkpoints
    hold), the decode form writing fp32 split-K partials and the prefill form the output."""
    def signature(dtype, name, out):
        return {"x_ptr": f"*{name}", "w_ptr": "*i32", "s_ptr": f"*{_SCALE_DTYPES[dtype]}", "out_ptr": out,
                "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                "stride_sn": "i32", "stride_sg": "constexpr", "group_size": "i32", "k_per_split": "i32",
                "stride_split": "i32"}

    # What the JIT specializes for the model's shapes: 16-byte aligned tensors, N, K and row
    # strides multiples of 16; stride_sg == 1 (contiguous scales) becomes a constant.
    return plan.compile_specs("w4a16", _w4a16_kernel, configs, capability, signature, {"stride_sg": 1},
                              _ALIGNED_ARGS)
