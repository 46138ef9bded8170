"""What the two weight-quantized linears (w4a16_linear.py, fp8_linear.py) share: their tile
configs, the split-K plan of the decode (GEMV) form, and the reduction of split-K partials.

Both kernels compute out[M, N] = x[M, K] @ dequant(W)[N, K].T with W read once in its stored form
and dequantized in registers, fp32 accumulation. Two forms, one kernel each:
  * decode (M <= DECODE_MAX_M): tall-skinny. Bound by reading the weights, so the grid must cover
    every SM even when N / BLOCK_N tiles are few: K is split into SPLIT slices, each program
    writes an fp32 partial [M, N] and the partials are summed (deterministically, by torch) into
    x.dtype. The grid's first axis is the M tiles: where the batch spans more than one (a tile
    of 16 rows, batches 17..32), the programs that read the same weight tile run next to each
    other, and the second read comes from L2.
  * prefill (M > DECODE_MAX_M): ordinary output tiles over the whole K, written in x.dtype.
"""
from __future__ import annotations

import torch
import triton

from pixtral_fast.kernels import INTERPRETING, TRITON_DTYPE, arch, sm_count

DECODE_MAX_M = 32
MAX_SPLIT = 16


def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


# Under the interpreter: small tiles, so that test shapes span several tiles in every dimension
# with a ragged last one, and few splits still cover K in more than one slice.
INTERPRETER_DECODE = cfg(16, 32, 32, 4, 1)
INTERPRETER_PREFILL = cfg(32, 32, 32, 4, 1)


def plan_split(m_tiles: int, n_tiles: int, k: int, block_k: int, programs_wanted: int) -> tuple[int, int]:
    """(split, k_per_split): the fewest K slices that give about programs_wanted programs, each
    slice a whole number of BLOCK_K (so that no tile straddles two slices)."""
    k_blocks = triton.cdiv(k, block_k)
    split = max(1, min(MAX_SPLIT, k_blocks, triton.cdiv(programs_wanted, m_tiles * n_tiles)))
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def output_buffer(m: int, n: int, split: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Where the kernel writes: the output itself (one slice) or fp32 partials [split, M, N]."""
    if split == 1:
        return torch.empty((m, n), dtype=dtype, device=device)
    return torch.empty((split, m, n), dtype=torch.float32, device=device)


def finish(buffer: torch.Tensor, split: int, dtype: torch.dtype) -> torch.Tensor:
    return buffer if split == 1 else buffer.sum(dim=0).to(dtype)


def launch(kernel, x2d: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, n: int,
           layout_args: tuple, configs, split: int | None, config: dict | None,
           constexprs: dict | None = None) -> torch.Tensor:
    """The launcher both kernels share: pick the form (decode or prefill) and its tiles, plan the
    K split, launch over (N tiles, M tiles, split) and sum the partials. The kernel's arguments are
    (x, weight, scales, out, M, N, K, stride_xm, *layout_args, k_per_split, stride_split, tiles);
    layout_args are what differs between the weight formats (strides, group size). configs(capability,
    dtype) is the kernel's own tile table; split / config (tests, benchmarks) override the plan;
    constexprs, the kernel's other compile-time arguments. The grid is (M tiles, N tiles, split)."""
    m, k = x2d.shape
    decode = m <= DECODE_MAX_M
    if config is None:
        if INTERPRETING:
            config = INTERPRETER_DECODE if decode else INTERPRETER_PREFILL
        else:
            config = configs(arch(x2d.device), x2d.dtype)["decode" if decode else "prefill"]
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=x2d.dtype, device=x2d.device)
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    m_tiles, n_tiles = triton.cdiv(m, bm), triton.cdiv(n, bn)
    if split is None:
        wanted = 2 * (4 if INTERPRETING else sm_count(x2d.device)) if decode else 1
        split, k_per_split = plan_split(m_tiles, n_tiles, k, bk, wanted)
    else:
        k_per_split = triton.cdiv(triton.cdiv(k, bk), split) * bk
        split = triton.cdiv(k, k_per_split)
    out = output_buffer(m, n, split, x2d.dtype, x2d.device)
    kernel[(m_tiles, n_tiles, split)](
        x2d, weight, scales, out, m, n, k, x2d.stride(0), *layout_args, k_per_split, m * n,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=config["num_warps"], num_stages=config["num_stages"],
        **(constexprs or {}),
    )
    return finish(out, split, x2d.dtype)


def rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] without a copy; a clear ValueError where its strides do not allow it."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError as exc:
        raise ValueError(f"x {tuple(x.shape)} with strides {x.stride()}: its leading dimensions "
                         "must flatten without a copy") from exc


def compile_specs(family: str, kernel, configs, capability: int, signature, constexprs: dict,
                  aligned_args: tuple[str, ...], extra_constexprs: tuple[str, ...] = ()) -> list[dict]:
    """The ahead-of-time compile specs of one kernel: both forms per activation dtype, the decode
    form writing fp32 split-K partials and the prefill form the output. signature(dtype, name,
    out) gives the kernel's argument types before the tiles (name: the activation's Triton type,
    out: the output pointer's); constexprs, its constant arguments other than the tiles;
    aligned_args, the arguments the JIT sees 16-byte aligned / divisible by 16 at the model's shapes;
    extra_constexprs, constexpr arguments of the kernel other than the tiles (their values in
    constexprs), declared in the signature."""
    specs = []
    for dtype, name in TRITON_DTYPE.items():
        for form, c in configs(capability, dtype).items():
            out = "*fp32" if form == "decode" else f"*{name}"
            specs.append({
                "name": f"{family}_{form}_{name}_{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
                        f"_w{c['num_warps']}s{c['num_stages']}",
                "fn": kernel,
                "signature": signature(dtype, name, out)
                | {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
                | {name: "constexpr" for name in extra_constexprs},
                "constexprs": constexprs | {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]},
                "attrs": {arg: [["tt.divisibility", 16]] for arg in aligned_args},
                "num_warps": c["num_warps"], "num_stages": c["num_stages"],
            })
    return specs
