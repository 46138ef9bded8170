"""Gated FFN, Triton: hidden = act(x @ w_gate.T) * (x @ w_up.T) in one kernel, then
out = hidden @ w_down.T by cuBLAS (torch.matmul).

The fused kernel runs both GEMMs over the same x tiles (each x tile is loaded once for two dots)
into two fp32 accumulators, applies the activation in the epilogue and writes the hidden tensor
once, in x.dtype: the gate and up outputs never reach HBM. Programs are ordered in groups of
GROUP_M row blocks so that neighbouring programs share weight tiles in L2. The down projection
is a plain GEMM that cuBLAS already runs at peak; fusing it would need a split over the hidden
dimension with an fp32 reduction, for nothing measurable.

activation (a constexpr): "silu", "gelu" (erf) or "gelu_tanh", the latter through
tanh(z) = 2*sigmoid(2z) - 1 since libdevice's tanh is unavailable in the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import INTERPRETING, TRITON_DTYPE, arch
from pixtral_fast.kernels._specialize import jit_specialized

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _activate(g, ACTIVATION: tl.constexpr):
    # Divisions are tl.fdiv (approximate, 2 ulp): the IEEE division behind tl.sigmoid's "/"
    # costs ~40 registers in this epilogue, where both accumulators are still live.
    if ACTIVATION == "silu":
        return tl.fdiv(g, 1.0 + tl.exp(-g))
    elif ACTIVATION == "gelu":
        return 0.5 * g * (1.0 + tl.erf(g * _SQRT1_2))
    else:  # gelu_tanh: 0.5 g (1 + tanh(z)) = g * sigmoid(2z), as tanh(z) = 2 sigmoid(2z) - 1
        z = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        return tl.fdiv(g, 1.0 + tl.exp(-2.0 * z))


@triton.jit
def _gated_kernel(
    x_ptr, wg_ptr, wu_ptr, h_ptr, M, N, K, stride_xm, stride_wn, M_BUCKET,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # M_BUCKET only keys the autotuner (configs per size class of M); the kernel ignores it.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the columns together, so a weight tile fetched
    # by one program is still in L2 for the next GROUP_M - 1.
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M - row0
    n_ok = offs_n < N - col0
    # 64-bit scalar bases and 32-bit tile offsets: pointer tensors would cost two registers
    # per element, which two accumulators cannot afford. The [BLOCK_K, BLOCK_N] offsets into
    # the [N, K] weights serve both weights and feed the dots transposed.
    x_tile = x_ptr + row0.to(tl.int64) * stride_xm
    wg_tile = wg_ptr + col0.to(tl.int64) * stride_wn
    wu_tile = wu_ptr + col0.to(tl.int64) * stride_wn
    x_off = offs_m[:, None] * stride_xm + offs_k[None, :]
    w_off = offs_n[None, :] * stride_wn + offs_k[:, None]

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_tile + x_off, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(wg_tile + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(wu_tile + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # ieee: fp32 inputs stay fp32 (no TF32); fp16/bf16 are unaffected.
        acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
        acc_u = tl.dot(x, wu, acc_u, input_precision="ieee")
        x_tile += BLOCK_K
        wg_tile += BLOCK_K
        wu_tile += BLOCK_K

    hidden = _activate(acc_g, ACTIVATION) * acc_u
    h_ptrs = h_ptr + row0.to(tl.int64) * N + col0 + (offs_m[:, None] * N + offs_n[None, :])
    tl.store(h_ptrs, hidden.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# configs


def _cfg(bm, bn, bk, warps, stages, group=8) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group,
            "num_warps": warps, "num_stages": stages}


def configs(capability: int, dtype: torch.dtype) -> list[dict]:
    """Autotune candidates; shared memory per stage is (BM + 2 BN) * BK * itemsize, and the two
    fp32 accumulators take 2 * BM * BN / (32 * warps) registers per thread.
    Hopper (227 KB): 128x128x64 on 8 warps (wgmma; 226 registers) at 3-4 stages for the ViT
    and prefill shapes, narrower tiles for mid-size M, and 16/32-row tiles for decode (M =
    batch), which is bound by reading the weights. Ampere (163 KB, mma.sync operands in
    registers): 128x128 with two accumulators spills, so 128x64 / 64x128 on 8 warps carry the
    same work per CTA as a single GEMM's 128x128. fp32 (IEEE dots run on the FMA units): small
    BLOCK_K keeps the unrolled operand fragments in registers. Every config here compiles
    without spills (tests/test_kernel_compile.py), with some margin below 255 registers."""
    if dtype == torch.float32:
        return [_cfg(64, 64, 16, 8, 2), _cfg(32, 64, 16, 4, 2)]
    if capability >= 90:
        return [_cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
                _cfg(64, 128, 64, 4, 4), _cfg(32, 64, 128, 4, 4), _cfg(16, 64, 128, 4, 4)]
    return [_cfg(128, 64, 64, 8, 3), _cfg(64, 128, 64, 8, 3), _cfg(64, 64, 32, 4, 4),
            _cfg(32, 64, 128, 4, 3), _cfg(16, 64, 128, 4, 3)]


# One config under the interpreter (where @triton.autotune cannot benchmark): small tiles so
# that the test shapes still span several blocks, a full and a ragged one, in every dimension.
_INTERPRETER_CONFIG = _cfg(32, 32, 32, 4, 1, group=2)

_TUNED: dict[tuple, object] = {}


def _autotuned(capability: int, dtype: torch.dtype):
    key = (capability, dtype)  # one autotuner (and cache of winners) per dtype, explicitly
    if key not in _TUNED:
        cands = [triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                               num_warps=c["num_warps"], num_stages=c["num_stages"])
                 for c in configs(capability, dtype)]
        _TUNED[key] = triton.autotune(configs=cands, key=["M_BUCKET", "N", "K"])(_gated_kernel)
    return _TUNED[key]


def _m_bucket(m: int) -> int:
    return min(8192, max(16, triton.next_power_of_2(m)))


def gated_activation(x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, activation: str,
                     config: dict | None = None) -> torch.Tensor:
    """act(x2d @ w_gate.T) * (x2d @ w_up.T) -> [M, N] in x2d.dtype. x2d [M, K] with unit column
    stride (any row stride); weights [N, K] with unit column stride and the same row stride.
    config (one of `configs()`, for tests and benchmarks) bypasses the autotuner."""
    M, K = x2d.shape
    N = w_gate.shape[0]
    if x2d.stride(1) != 1 or w_gate.stride(1) != 1 or w_up.stride() != w_gate.stride():
        raise ValueError("gated_activation needs unit stride along K and w_up laid out like w_gate")
    hidden = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return hidden
    args = (x2d, w_gate, w_up, hidden, M, N, K, x2d.stride(0), w_gate.stride(0), _m_bucket(M))
    if config is None and INTERPRETING:
        config = _INTERPRETER_CONFIG
    if config is not None:
        c = config
        grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
        _gated_kernel[grid](*args, ACTIVATION=activation, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                            BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"], num_warps=c["num_warps"],
                            num_stages=c["num_stages"])
        return hidden
    kernel = _autotuned(arch(x2d.device), x2d.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernel[grid](*args, ACTIVATION=activation)
    return hidden


def gated_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              activation: str) -> torch.Tensor:
    """w_down(act(x @ w_gate.T) * (x @ w_up.T)) for x [..., K] (last dim contiguous). Inputs are
    validated by pixtral_fast.ops."""
    K = x.shape[-1]
    try:
        x2d = x.view(-1, K)  # never a hidden copy: the kernel takes any row stride
    except RuntimeError as exc:
        raise ValueError(f"x {tuple(x.shape)} with strides {x.stride()}: its leading dimensions "
                         "must flatten without a copy") from exc
    hidden = gated_activation(x2d, w_gate, w_up, activation)
    out = torch.matmul(hidden, w_down.t())
    return out.view(*x.shape[:-1], w_down.shape[0])


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs

# The launches the specs stand for: Pixtral-12B's decoder FFN gate/up projection (N 14336,
# K 5120; x and the weights contiguous, row strides K), M a batch of decode rows for the
# 16/32-row tiles and a prefill's tokens for the others; neither 1 nor a multiple of 16, as most
# M are (M == 1, batch-1 decode, is a variant of its own with M compiled in, which
# tests/test_sass_ceiling.py compiles). The vision encoder's FFN (N 4096, K 1024) specializes
# the same way.
_SPEC_N, _SPEC_K = 14336, 5120
_SPEC_M_DECODE, _SPEC_M_PREFILL = 7, 1000
# The heaviest epilogue: erf's polynomial takes ~10 more registers than silu / gelu_tanh (checked).
_SPEC_ACTIVATION = "gelu"


def compile_specs(capability: int) -> list[dict]:
    """Every autotune candidate shipped for this arch, per dtype, with the gelu epilogue,
    specialized as the JIT specializes it at the launch above (jit_specialized): 16-byte
    aligned tensors, N, K, the row strides and M_BUCKET (a power of two >= 16) divisible by 16."""
    specs = []
    for dtype, name in TRITON_DTYPE.items():
        ptr = f"*{name}"
        for c in configs(capability, dtype):
            m = _SPEC_M_DECODE if c["BLOCK_M"] <= 32 else _SPEC_M_PREFILL
            values = {"M": m, "N": _SPEC_N, "K": _SPEC_K, "stride_xm": _SPEC_K, "stride_wn": _SPEC_K,
                      "M_BUCKET": _m_bucket(m)}
            specs.append({
                "name": f"gated_{name}_{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
                        f"_w{c['num_warps']}s{c['num_stages']}",
                "fn": _gated_kernel,
                **jit_specialized(
                    _gated_kernel,
                    {"x_ptr": ptr, "wg_ptr": ptr, "wu_ptr": ptr, "h_ptr": ptr, "M": "i32", "N": "i32",
                     "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "M_BUCKET": "i32",
                     "ACTIVATION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                     "BLOCK_K": "constexpr", "GROUP_M": "constexpr"},
                    {"ACTIVATION": _SPEC_ACTIVATION, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"],
                     "BLOCK_K": c["BLOCK_K"], "GROUP_M": c["GROUP_M"]},
                    values),
                "num_warps": c["num_warps"], "num_stages": c["num_stages"],
            })
    return specs
