"""Weight-only FP8 linear, Triton: out = x @ (w_fp8 * scale).T, the weights read as e4m3 bytes.

Weights float8_e4m3fn [N, K] (compressed-tensors `float-quantized`), scale per output channel
([N, 1] / [N]) or per tensor ([1] / []): a scale is constant along K, so the tile dot runs on the
raw e4m3 values (exact in fp16 and bf16) and the scale multiplies the fp32 accumulator once, at
the end.

The kernel reads the weights as bytes and decodes e4m3 itself (_e4m3_to_fp16: two integer ops,
one bitcast, one multiply per element, hidden behind the weight loads of the decode form). One
code path for every arch: Triton refuses the fp8e4nv type before sm_89 (the interpreter's e4m3
casts are right only through the fix in _interpreter.py; integer ops and fp16 need none).

Prefill uses this same kernel with prefill tiles (no activation quantization, no _scaled_mm): the
result is the dequantized model's, on every arch. Decode and prefill forms: _quant_linear.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import _quant_linear as plan


@triton.jit
def _e4m3_to_fp16(bits):
    """e4m3 bytes (uint8) -> fp16, exactly. The 4 exponent and 3 mantissa bits are placed in the
    top of an fp16's exponent and mantissa fields, which reads as the same number divided by
    2^8 (bias 15 instead of 7), subnormals included; fp16 keeps its subnormals on every GPU, so
    the product with 256 is exact. 0x7F / 0xFF (e4m3fn's NaN) come out as +-480: quantizers
    clamp to +-448, so a checkpoint never holds them."""
    b = bits.to(tl.uint16)
    half = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
    return half.to(tl.float16, bitcast=True) * 256.0


# M (the batch rows) is not specialized: decode batches 1..32 would otherwise compile three
# variants per kernel (M == 1, M % 16 == 0, other); M only bounds masks.
@triton.jit(do_not_specialize=["M"])
def _fp8_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_s, k_per_split, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # stride_s: 1 for per-channel scales, 0 for one per-tensor scale.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M - row0
    n_ok = offs_n < N - col0

    x_rows = x_ptr + row0.to(tl.int64) * stride_xm + offs_m[:, None] * stride_xm
    # [BLOCK_K, BLOCK_N] offsets into the [N, K] weights: the dot's B operand, contiguous along K.
    w_cols = w_ptr + col0.to(tl.int64) * stride_wn + offs_n[None, :] * stride_wn
    dot_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w8 = tl.load(w_cols + (k0 + offs_k)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        w = _e4m3_to_fp16(w8).to(dot_dtype)
        # ieee: fp32 activations stay fp32 (no TF32); fp16/bf16 are unaffected.
        acc = tl.dot(x, w, acc, input_precision="ieee")

    scale = tl.load(s_ptr + (col0 + offs_n) * stride_s, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    out_rows = out_ptr + pid_k.to(tl.int64) * stride_split + row0.to(tl.int64) * N
    out_ptrs = out_rows + offs_m[:, None] * N + col0 + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# configs and launcher


def configs(capability: int, dtype: torch.dtype) -> dict[str, dict]:
    """{"decode": ..., "prefill": ...} for this arch (90: Hopper; 80: Ampere and Ada) and dtype.
    Decode: 32 rows (the whole batch: the weights are streamed once) x 64 columns x 128 k (128 B
    of e4m3 per weight row and tile) on 8 warps (4 need ~255 registers), 3 stages. Prefill: 128x128 (Hopper) / 128x64 (Ampere) tiles on 8 warps with
    BLOCK_K 32 (64 takes 255 registers: the decoded tile sits next to the accumulator). fp32
    (IEEE dots on the FMA units): small tiles. All compile without spills."""
    if dtype == torch.float32:
        return {"decode": plan.cfg(32, 64, 16, 8, 2), "prefill": plan.cfg(64, 64, 16, 8, 2)}
    if capability >= 90:
        return {"decode": plan.cfg(32, 64, 128, 8, 3), "prefill": plan.cfg(128, 128, 32, 8, 3)}
    return {"decode": plan.cfg(32, 64, 128, 8, 3), "prefill": plan.cfg(128, 64, 32, 8, 3)}


def fp8_matmul(x2d: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, split: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """x2d [M, K] (unit column stride) @ (weight [N, K] e4m3 * scales).T -> [M, N] in x2d.dtype.
    scales: N values (per channel) or 1 (per tensor), contiguous. Inputs are validated by
    pixtral_fast.ops. split / config (tests, benchmarks) override the K split and the tiles."""
    N = weight.shape[0]
    scales = scales.reshape(-1)
    stride_s = 1 if scales.numel() == N and N > 1 else 0
    return plan.launch(_fp8_kernel, x2d, weight.view(torch.uint8), scales, N, (weight.stride(0), stride_s),
                       configs, split, config)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N]; leading dimensions flattened without a copy."""
    return fp8_matmul(plan.rows(x), weight, scales).view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs

_ALIGNED_ARGS = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn")


def compile_specs(capability: int) -> list[dict]:
    """Both forms per activation dtype, per-channel scales in the activation dtype (the JIT
    makes stride_s == 1 a constant; per-tensor passes 0, a plain int, compiled the same way),
    the decode form writing fp32 split-K partials and the prefill form the output."""
    def signature(dtype, name, out):
        return {"x_ptr": f"*{name}", "w_ptr": "*u8", "s_ptr": f"*{name}", "out_ptr": out,
                "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                "stride_s": "constexpr", "k_per_split": "i32", "stride_split": "i32"}

    return plan.compile_specs("fp8", _fp8_kernel, configs, capability, signature, {"stride_s": 1}, _ALIGNED_ARGS)
