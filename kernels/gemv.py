"""Dense split-K GEMV, Triton: out = x @ w.T for a few activation rows (decode batches, M 1..32) and
a dense weight w [N, K] (bf16 / fp16 / fp32, row-major), fp32 accumulation, out in x.dtype.

Issue 17, item 4: at small M a linear is a read of its weight, so the kernel is built to stream
the weight at HBM bandwidth and nothing else:
  * each program streams [BLOCK_N, BLOCK_K] tiles of w along K, 16 bytes per thread and load
    (16 x 128 x 128 bf16: 32 KiB per iteration and CTA), through Triton's pipelined asynchronous
    copies (num_stages - 1 tiles in flight while one is consumed);
  * the main loop runs over whole BLOCK_K tiles with no mask on the weight: rows past N are clamped
    to row N - 1 (read, never stored), and the ragged end of K is one masked tile after the loop
    (as kernels/fp8_linear.py does);
  * M is handled by a tl.dot with the rows padded to BLOCK_M = 16 (32 for batches of 17..32),
    chosen by the sm_90 SASS (Triton 3.9, H200 issue rate; tests/test_sass_ceiling.py): the loop
    is 124 warp instructions (32 HMMA.16816, 24 LDSM, 18 LDGSTS.128, ...) per warp for 32 KiB on
    4 warps, an issue ceiling of 69 TB/s (50 TB/s with 32-row tiles), 14x the H200's HBM. An fp32
    broadcast-multiply-reduce (weights straight to registers, a convert and an FMA per element
    and row), compiled the same way: 17 TB/s at M = 1 but 5 TB/s at M = 8 (below the 9.6 TB/s
    required), and without the asynchronous copies' bytes in flight; not used;
  * split-K: when N / BLOCK_N tiles cannot fill the GPU (the fused QKV: 48 tiles on 132 SMs), K is
    cut into `split` slices of whole BLOCK_K tiles (choose_split_k), each program writes an fp32
    partial [M, N] and a second kernel (_reduce_kernel) sums the slices in slice order and casts
    to x.dtype.

Launches: one when split == 1 (the output head: 1024 N tiles, the kernel writes x.dtype itself),
two otherwise (GEMV + reduction; the partial buffer is torch.empty, no zeroing launch). fp32
atomics into a zeroed buffer were not chosen: they need a zeroing and a cast launch as well
(three), and the order in which the partials land differs from run to run, so a logit could
differ in its last bit between two identical decode steps: greedy decoding must be reproducible
and batch-invariant. Here each output element's sum has a fixed order that depends only on
(N, K, the device's SM count): the split is chosen without looking at M, so a row's result does
not depend on the batch it is decoded in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import INTERPRETING, TRITON_DTYPE, arch, sm_count
from pixtral_fast.kernels._specialize import jit_specialized

MAX_SPLIT = 16
PROGRAMS_PER_SM = 2  # the split's target: programs per SM (three 72 KiB CTAs fit an SM's 228 KiB)
REDUCE_BLOCK = 512
_SPLIT_ALIGN = 64  # elements: each fp32 partial slice starts 256-byte aligned (16-byte stores)


# M (the batch rows) is not specialized: batches 1..32 would otherwise compile three variants per
# shape (M == 1, M % 16 == 0, other); M only bounds masks.
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, k_per_split, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out_ptr: the output [M, N] in x.dtype (one slice) or fp32 partials [split, stride_split].
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
    # [BLOCK_N, BLOCK_K] rows of the [N, K] weight, contiguous along K; rows past N read row N - 1.
    w_rows = w_ptr + tl.minimum(col0 + offs_n, N - 1).to(tl.int64)[:, None] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_full, BLOCK_K):
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.load(w_rows + (k0 + offs_k)[None, :])
        # ieee: fp32 stays fp32 (no TF32); fp16/bf16 are unaffected.
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if k_full < k_end:  # the ragged end of K: one masked tile
        k_ok = offs_k < k_end - k_full
        x = tl.load(x_rows + (k_full + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + (k_full + offs_k)[None, :], mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")

    n_ok = offs_n < N - col0
    out_rows = out_ptr + pid_k.to(tl.int64) * stride_split + row0.to(tl.int64) * N
    out_ptrs = out_rows + offs_m[:, None] * N + col0 + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["MN", "SPLIT"])
def _reduce_kernel(part_ptr, out_ptr, MN, stride_split, SPLIT, BLOCK: tl.constexpr, MAX_SPLIT: tl.constexpr):
    """out[i] = ((part[0, i] + part[1, i]) + part[2, i]) + ... over the SPLIT slices, in slice order
    (fp32), cast to out's dtype. Unrolled over MAX_SPLIT with the slices past SPLIT masked off (no
    memory traffic; adding their 0.0 changes nothing): the loads are independent, so all issue at
    once and the kernel pays one L2 round trip, not one per slice."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN  # (MN is not specialized: 4-byte loads, all issued before the first add)
    ptrs = part_ptr + offs
    acc = tl.load(ptrs, mask=ok, other=0.0)
    for s in tl.static_range(1, MAX_SPLIT):
        ptrs += stride_split  # 64-bit pointers: no int32 product to overflow
        acc += tl.load(ptrs, mask=ok & (offs * 0 + s < SPLIT), other=0.0)  # (a tensor mask: the interpreter's rule)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# configs


def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


def config(capability: int, dtype: torch.dtype, m: int) -> dict:
    """The tiles for this arch (90: Hopper; 80: Ampere and Ada), dtype and batch: 16 rows for
    M <= 16, 32 rows above (the weight is then read once, not once per 16-row tile).
    fp16/bf16 on Hopper: 128 x 128 weight tiles (32 KiB) on 4 warps, 3 stages (two tiles in flight
    while one is consumed: 72 KiB of shared memory, up to three CTAs per SM). Ampere/Ada (Ada has
    99 KiB): 128 x 64, 3 stages (36 KiB).
    fp32 (IEEE dots on the FMA units): 64 x 32 tiles, 2 stages. All compile without spills
    (tests/test_kernel_compile.py)."""
    bm = 16 if m <= 16 else 32
    if dtype == torch.float32:
        return cfg(bm, 64, 32, 4, 2)
    if capability >= 90:
        return cfg(bm, 128, 128, 4, 3)
    return cfg(bm, 128, 64, 4, 3)


def interpreter_config(m: int) -> dict:
    """Under the interpreter: small tiles, so that test shapes span several tiles in every
    dimension with a ragged last one, and few splits still cut K into several slices."""
    return cfg(16 if m <= 16 else 32, 32, 32, 4, 1)


def _plan(k: int, block_k: int, split: int) -> tuple[int, int]:
    """(split, k_per_split) for at most `split` slices of whole BLOCK_K tiles: no tile straddles two
    slices, and no slice is empty (7 asked of 5 tiles gives 5)."""
    k_blocks = max(1, triton.cdiv(k, block_k))
    k_per_split = triton.cdiv(k_blocks, max(1, min(split, k_blocks))) * block_k
    return max(1, triton.cdiv(k, k_per_split)), k_per_split


def choose_split_k(M: int, N: int, K: int, sm_count: int, block_n: int = 128, block_k: int = 128) -> int:
    """How many K slices: the fewest that give PROGRAMS_PER_SM programs per SM over the N tiles,
    at most MAX_SPLIT and never more than K has BLOCK_K tiles; 1 where the N tiles alone fill the
    GPU. M is deliberately not used (nor the M tiles it makes): the split fixes each output's
    summation order, and a row must come out the same whatever batch it is decoded in.
    Pixtral-12B on 132 SMs (128 x 128 tiles): fused QKV (N 6144, K 5120) 6, output head
    (131072, 5120) 1, wo (5120, 4096) 7, w2 (5120, 14336) 7."""
    del M  # batch-invariant on purpose (docstring)
    n_tiles = triton.cdiv(max(N, 1), block_n)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, n_tiles)
    return _plan(K, block_k, max(1, min(MAX_SPLIT, wanted)))[0]


# ---------------------------------------------------------------------------------------------
# launcher


def _check(x: torch.Tensor, w: torch.Tensor, split_k) -> None:
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in TRITON_DTYPE:
            raise ValueError(f"{name} has dtype {t.dtype}; gemv takes float32, float16 or bfloat16")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along K (stride {t.stride(1)})")
    if w.dtype != x.dtype:
        raise ValueError(f"w has dtype {w.dtype} but x has {x.dtype}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w {tuple(w.shape)} must be [N, K] with x's K = {x.shape[1]}")
    if w.device != x.device:
        raise ValueError(f"w is on {w.device} but x is on {x.device}")
    if x.device.type != "cuda" and not INTERPRETING:
        raise ValueError(f"x is on {x.device}: gemv needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors")
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be None or an int >= 1, got {split_k!r}")


def gemv(x: torch.Tensor, w: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in x.dtype, fp32 accumulation; x and w fp32, fp16 or bf16
    (the same), unit stride along K (any row stride), on one CUDA device (CPU under
    TRITON_INTERPRET=1). Meant for M <= 32 (correct for any M). split_k: the number of K slices
    (None: choose_split_k; capped at MAX_SPLIT and at K's number of BLOCK_K tiles, fewer where
    the tiles do not divide evenly). Launches: 1 (split 1) or 2 (GEMV + the ordered reduction). Deterministic:
    the same inputs and split give the same bits, run after run."""
    _check(x, w, split_k)
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return torch.empty((M, N), dtype=x.dtype, device=x.device)
    if K == 0:
        return torch.zeros((M, N), dtype=x.dtype, device=x.device)
    c = interpreter_config(M) if INTERPRETING else config(arch(x.device), x.dtype, M)
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    if split_k is None:
        split_k = choose_split_k(M, N, K, 4 if INTERPRETING else sm_count(x.device), bn, bk)
    split, k_per_split = _plan(K, bk, min(split_k, MAX_SPLIT))
    stride_split = triton.cdiv(M * N, _SPLIT_ALIGN) * _SPLIT_ALIGN
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    target = out if split == 1 else torch.empty((split, stride_split), dtype=torch.float32, device=x.device)
    _gemv_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn), split)](
        x, w, target, M, N, K, x.stride(0), w.stride(0), k_per_split, stride_split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    if split > 1:
        _reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](
            target, out, M * N, stride_split, split, BLOCK=REDUCE_BLOCK, MAX_SPLIT=MAX_SPLIT, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs

# Pixtral-12B's text decoder linears (N, K) at batch 1 on 132 SMs (an H100 / H200), x and w
# contiguous (row strides K).
SHAPES = {"qkv": (6144, 5120), "head": (131072, 5120), "wo": (5120, 4096), "w2": (5120, 14336)}
SPEC_SMS = 132


def launch_values(shape: str, m: int, capability: int, dtype: torch.dtype) -> tuple[dict, dict, int]:
    """(config, the _gemv_kernel int arguments, split) of gemv's launch at a model shape: what the
    compile specs and the SASS ceiling compile."""
    n, k = SHAPES[shape]
    c = config(capability, dtype, m)
    split, k_per_split = _plan(k, c["BLOCK_K"], choose_split_k(m, n, k, SPEC_SMS, c["BLOCK_N"], c["BLOCK_K"]))
    values = {"M": m, "N": n, "K": k, "stride_xm": k, "stride_wn": k, "k_per_split": k_per_split,
              "stride_split": triton.cdiv(m * n, _SPLIT_ALIGN) * _SPLIT_ALIGN}
    return c, values, split


def _gemv_spec(capability: int, dtype: torch.dtype, shape: str, m: int) -> dict:
    name = TRITON_DTYPE[dtype]
    c, values, split = launch_values(shape, m, capability, dtype)
    out = f"*{name}" if split == 1 else "*fp32"
    tiles = {k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    return {
        "name": f"gemv_{name}_{shape}_m{m}_{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
                f"_w{c['num_warps']}s{c['num_stages']}_split{split}",
        "fn": _gemv_kernel,
        **jit_specialized(
            _gemv_kernel,
            {"x_ptr": f"*{name}", "w_ptr": f"*{name}", "out_ptr": out, "M": "i32", "N": "i32", "K": "i32",
             "stride_xm": "i32", "stride_wn": "i32", "k_per_split": "i32", "stride_split": "i32",
             "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            tiles, values),
        "num_warps": c["num_warps"], "num_stages": c["num_stages"],
    }


def _reduce_spec(dtype: torch.dtype, shape: str, m: int, split: int) -> dict:
    name = TRITON_DTYPE[dtype]
    n, _ = SHAPES[shape]
    return {
        "name": f"gemv_reduce_{name}_{shape}_m{m}_split{split}",
        "fn": _reduce_kernel,
        **jit_specialized(
            _reduce_kernel,
            {"part_ptr": "*fp32", "out_ptr": f"*{name}", "MN": "i32", "stride_split": "i32", "SPLIT": "i32",
             "BLOCK": "constexpr", "MAX_SPLIT": "constexpr"},
            {"BLOCK": REDUCE_BLOCK, "MAX_SPLIT": MAX_SPLIT},
            {"MN": m * n, "stride_split": triton.cdiv(m * n, _SPLIT_ALIGN) * _SPLIT_ALIGN, "SPLIT": split}),
        "num_warps": 4, "num_stages": 3,
    }


def compile_specs(capability: int) -> list[dict]:
    """bf16 at the four shapes, batch 1 (the output head writes bf16 itself, the others fp32
    partials and their reduction), bf16 at batch 32 (32-row tiles) on the fused QKV, and fp16 /
    fp32 on the fused QKV at batch 1; each specialized as the JIT specializes it at that launch
    (jit_specialized)."""
    runs = [(torch.bfloat16, shape, 1) for shape in SHAPES]
    runs += [(torch.bfloat16, "qkv", 32), (torch.float16, "qkv", 1), (torch.float32, "qkv", 1)]
    specs = []
    for dtype, shape, m in runs:
        specs.append(_gemv_spec(capability, dtype, shape, m))
        split = launch_values(shape, m, capability, dtype)[2]
        if split > 1:
            specs.append(_reduce_spec(dtype, shape, m, split))
    return specs
