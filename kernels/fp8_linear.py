"""Weight-only FP8 linear, Triton: out = x @ (w_fp8 * scale).T, the weights read as e4m3 bytes.

Weights float8_e4m3fn [N, K] (compressed-tensors `float-quantized`), scale per output channel
([N, 1] / [N]) or per tensor ([1] / []): a scale is constant along K, so the tile dot runs on the
raw e4m3 values (exact in fp16, bf16 and fp32) and the scale multiplies the fp32 accumulator once,
at the end.

Decoding e4m3, chosen by the constexpr HW_CVT:
  * sm_89 and newer (HW_CVT): the hardware conversion, `cvt.rn.f16x2.e4m3x2` (one instruction per
    two weights; for bf16 dots then fp16 -> fp32 -> bf16x2, exact: e4m3 has 3 mantissa bits);
  * sm_80 (Triton refuses the fp8e4nv type there): the integer decode _e4m3_to_fp16 (two integer
    ops, one bitcast, one multiply per element).
Under the interpreter both run (tests take each; the interpreter's e4m3 casts are right through
the fix in _interpreter.py; the integer decode needs none).

The main loop streams whole BLOCK_K tiles with no mask on the weights: rows past N are clamped to
row N - 1 (read, never stored) and the ragged end of K is one masked tile after the loop. With the
operands in the dot's layout straight from shared memory (Triton's pipelined copies), the sm_90
loop issues ~2 instructions per weight byte and thread: tests/test_sass_ceiling.py.

Prefill uses this same kernel with prefill tiles (no activation quantization, no _scaled_mm): the
result is the dequantized model's, on every arch. Decode and prefill forms: _quant_linear.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import INTERPRETING
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


@triton.jit
def _decode(bits, dot_dtype: tl.constexpr, HW_CVT: tl.constexpr):
    """e4m3 bytes (uint8) -> dot_dtype, exactly."""
    if HW_CVT:
        e4m3 = bits.to(tl.float8e4nv, bitcast=True)
        if dot_dtype == tl.float16:
            return e4m3.to(tl.float16)
        # bf16 (and fp32): through fp32, which Triton converts to bf16 two at a time
        return e4m3.to(tl.float32).to(dot_dtype)
    return _e4m3_to_fp16(bits).to(dot_dtype)


# M (the batch rows) is not specialized: decode batches 1..32 would otherwise compile three
# variants per kernel (M == 1, M % 16 == 0, other); M only bounds masks.
@triton.jit(do_not_specialize=["M"])
def _fp8_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_s, k_per_split, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HW_CVT: tl.constexpr,
):
    # stride_s: 1 for per-channel scales, 0 for one per-tensor scale.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    k_full = k_begin + (k_end - k_begin) // BLOCK_K * BLOCK_K  # whole tiles end here

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M - row0

    x_rows = x_ptr + row0.to(tl.int64) * stride_xm + offs_m[:, None] * stride_xm
    # [BLOCK_N, BLOCK_K] rows of the [N, K] weights, contiguous along K; rows past N read row N - 1.
    w_rows = w_ptr + tl.minimum(col0 + offs_n, N - 1).to(tl.int64)[:, None] * stride_wn
    dot_dtype: tl.constexpr = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_full, BLOCK_K):
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
        w = _decode(tl.load(w_rows + (k0 + offs_k)[None, :]), dot_dtype, HW_CVT)
        # ieee: fp32 activations stay fp32 (no TF32); fp16/bf16 are unaffected.
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if k_full < k_end:  # the ragged end of K: one masked tile
        k_ok = offs_k < k_end - k_full
        x = tl.load(x_rows + (k_full + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # (the integer decode here, on every arch: exact as well, and the loop above compiles tighter)
        w = _decode(tl.load(w_rows + (k_full + offs_k)[None, :], mask=k_ok[None, :], other=0), dot_dtype, False)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")

    n_ok = offs_n < N - col0
    scale = tl.load(s_ptr + (col0 + offs_n) * stride_s, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    out_rows = out_ptr + pid_k.to(tl.int64) * stride_split + row0.to(tl.int64) * N
    out_ptrs = out_rows + offs_m[:, None] * N + col0 + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# configs and launcher


def configs(capability: int, dtype: torch.dtype) -> dict[str, dict]:
    """{"decode": ..., "prefill": ...} for this arch (90: Hopper; 80: Ampere and Ada) and dtype.
    Decode: 16 rows (batch 1..16 in one tile; 17..32 in two, whose programs run side by side and
    share the weight tile through L2) on 4 warps, 3 stages in flight; Hopper streams 128 x 256
    e4m3 (32 KiB) per iteration: the sm_90 loop then issues ~10 TB/s worth of weights (more than
    twice the H200's HBM; tests/test_sass_ceiling.py), Ampere/Ada 128 x 128 (Ada's 99 KiB of
    shared memory). Prefill: 128x128 (Hopper) / 128x64 (Ampere) tiles on 8 warps with BLOCK_K 32
    (64 takes 255 registers: the decoded tile sits next to the accumulator). fp32 (IEEE dots on
    the FMA units): small tiles. All compile without spills."""
    if dtype == torch.float32:
        return {"decode": plan.cfg(32, 64, 16, 8, 2), "prefill": plan.cfg(64, 64, 16, 8, 2)}
    if capability >= 90:
        return {"decode": plan.cfg(16, 128, 256, 4, 3), "prefill": plan.cfg(128, 128, 32, 8, 3)}
    return {"decode": plan.cfg(16, 128, 128, 4, 3), "prefill": plan.cfg(128, 64, 32, 8, 3)}


def hardware_cvt(device: torch.device) -> bool:
    """Whether the GPU converts e4m3 itself (sm_89 and newer). Under the interpreter: True (the
    package's fix makes its e4m3 casts exact); tests run the integer decode as well."""
    if INTERPRETING:
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(x2d: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, split: int | None = None,
               config: dict | None = None, hw_cvt: bool | None = None) -> torch.Tensor:
    """x2d [M, K] (unit column stride) @ (weight [N, K] e4m3 * scales).T -> [M, N] in x2d.dtype.
    scales: N values (per channel) or 1 (per tensor), contiguous. Inputs are validated by
    pixtral_fast.ops. split / config / hw_cvt (tests, benchmarks) override the K split, the
    tiles and the choice of e4m3 decoding (hardware_cvt(device) by default)."""
    N = weight.shape[0]
    scales = scales.reshape(-1)
    stride_s = 1 if scales.numel() == N and N > 1 else 0
    if hw_cvt is None:
        hw_cvt = hardware_cvt(x2d.device)
    return plan.launch(_fp8_kernel, x2d, weight.view(torch.uint8), scales, N, (weight.stride(0), stride_s),
                       configs, split, config, {"HW_CVT": bool(hw_cvt)})


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N]; leading dimensions flattened without a copy."""
    return fp8_matmul(plan.rows(x), weight, scales).view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs

# k_per_split is a whole number of BLOCK_K; stride_split = M * N, N a multiple of 16.
_ALIGNED_ARGS = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn", "k_per_split",
                 "stride_split")


def compile_specs(capability: int) -> list[dict]:
    """Both forms per activation dtype, per-channel scales in the activation dtype (the JIT
    makes stride_s == 1 a constant; per-tensor passes 0, a plain int, compiled the same way),
    the decode form writing fp32 split-K partials and the prefill form the output; HW_CVT (the
    hardware e4m3 conversion) from sm_89 on, as hardware_cvt chooses at run time."""
    def signature(dtype, name, out):
        return {"x_ptr": f"*{name}", "w_ptr": "*u8", "s_ptr": f"*{name}", "out_ptr": out,
                "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                "stride_s": "constexpr", "k_per_split": "i32", "stride_split": "i32"}

    return plan.compile_specs("fp8", _fp8_kernel, configs, capability, signature,
                              {"stride_s": 1, "HW_CVT": capability >= 89}, _ALIGNED_ARGS, ("HW_CVT",))
