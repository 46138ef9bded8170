"""W4A16 linear, Triton: out = x @ dequant(packed, scales).T with the weights read packed.

Two kernels. The fast one, `_w4a16_k128_kernel` (w4a16_k128_matmul, below), reads the weights
repacked at load into its own layout (pixtral_fast.quant.formats.repack_w4a16_k128: group sizes
that are powers of two >= 32, or per channel): what QuantLinear holds and runs. The first one
(w4a16_matmul) reads the checkpoint's layout as it is, for any group size: the public
pixtral_fast.ops.w4a16_linear, and layers whose group size the k128 layout does not take.

The first kernel: weights in compressed-tensors' `pack-quantized` layout (pixtral_fast/quant/formats.py): packed
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

import functools

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import INTERPRETING
from pixtral_fast.kernels import _quant_linear as plan


# M (the batch rows) is not specialized: decode batches 1..32 would otherwise compile three
# variants per kernel (M == 1, M % 16 == 0, other); M only bounds masks.
@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_sg, group_size,
    k_per_split, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
# the k128 kernel: weights repacked at load (pixtral_fast.quant.formats.repack_w4a16_k128)
#
# Within each block of 128 inputs, halfword h of a row holds k = 32 c + h in nibble c. Loaded as
# int16 [BLOCK_N, 32] (64 contiguous bytes per row), nibble c of every halfword is a contiguous
# 32-input chunk: (h >> 4c) & 0xF, with no reshape, feeds tl.dot directly. On the GPU two
# halfwords share a 32-bit register and one lop3 makes both weights at once: OR-ing the nibble
# into the mantissa of 0x4300 (bf16 128.0; fp16 0x6400, 1024.0) gives 128 + u exactly
# (u = q + 8, the stored nibble). Two ways to remove the 136 (1032):
#   * SUB: one paired fma per two weights (exact: the values are small integers);
#   * FOLD (bf16 activations and scales): the dots take 128 + u as they are, and the kernel
#     subtracts 136 * sum_k x_k * scale(k) at the end of each K tile: the row sums of x per
#     scale group come from one more small dot per chunk, x @ IND (IND: -136 in the columns of
#     the chunk's group), are split into two bf16 parts (16 bits of the fp32 sums) and
#     multiplied by the groups' scale rows with one dot of K = 16.
# Each chunk's dot accumulates in fp32 and is scaled once per group of inputs (fp32 multiply-add
# of the group's scale row, [K / group_size, N]: one contiguous row per group), a finer rounding
# than dequantizing to the dot's dtype. Under the interpreter (which cannot run inline PTX) the
# same integer and float steps are written in Triton.
# The main loop streams whole BLOCK_K tiles without masks (rows past M and N clamped, read and
# never stored); the ragged end of K is one masked tile after it.


@triton.jit
def _nibble_asm(h, c: tl.constexpr, dot_dtype: tl.constexpr):
    """128 + u (bf16) / 1024 + u (fp16) for nibble c of each halfword, two per lop3."""
    if dot_dtype == tl.float16:
        if c == 0:
            r = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x64006400, 0xea;", "=r,r", [h],
                                          dtype=tl.float16, is_pure=True, pack=2)
        elif c == 1:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $1, 4; "
                                          "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xea; }",
                                          "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
        elif c == 2:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $1, 8; "
                                          "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xea; }",
                                          "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
        else:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $1, 12; "
                                          "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xea; }",
                                          "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
    else:
        if c == 0:
            r = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xea;", "=r,r", [h],
                                          dtype=tl.bfloat16, is_pure=True, pack=2)
        elif c == 1:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $1, 4; "
                                          "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }",
                                          "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
        elif c == 2:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $1, 8; "
                                          "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }",
                                          "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $1, 12; "
                                          "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }",
                                          "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
    return r


@triton.jit
def _minus_offset_asm(v, dot_dtype: tl.constexpr):
    """v - 136 (bf16) / v - 1032 (fp16), two per fma: exact (integers below 2^8 / 2^11)."""
    if dot_dtype == tl.float16:
        r = tl.inline_asm_elementwise(
            "{ .reg .b32 o, m; mov.b32 o, 0x3C003C00; mov.b32 m, 0xE408E408; fma.rn.f16x2 $0, $1, o, m; }",
            "=r,r", [v], dtype=tl.float16, is_pure=True, pack=2)
    else:
        r = tl.inline_asm_elementwise(
            "{ .reg .b32 o, m; mov.b32 o, 0x3F803F80; mov.b32 m, 0xC308C308; fma.rn.bf16x2 $0, $1, o, m; }",
            "=r,r", [v], dtype=tl.bfloat16, is_pure=True, pack=2)
    return r


@triton.jit
def _scale_f32(s, ASM: tl.constexpr):
    """Scales -> fp32; bf16 pairs on the GPU with one shift / one and each (exact)."""
    if ASM and s.dtype == tl.bfloat16:
        r = tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000; }", "=r,=r,r", [s],
                                      dtype=tl.float32, is_pure=True, pack=2)
    else:
        r = s.to(tl.float32)
    return r


@triton.jit
def _nibble(h, c: tl.constexpr, dot_dtype: tl.constexpr, ASM: tl.constexpr, FOLD: tl.constexpr):
    """Nibble c of the int16 halfwords h as the dot's operand: q (exact), or with FOLD 128 + u."""
    if dot_dtype == tl.float32:
        r = (((h.to(tl.int32) >> (4 * c)) & 0xF) - 8).to(tl.float32)
    elif ASM:
        r = _nibble_asm(h, c, dot_dtype)
        if not FOLD:
            r = _minus_offset_asm(r, dot_dtype)
    else:
        if dot_dtype == tl.float16:
            r = (((h.to(tl.int32) >> (4 * c)) & 0xF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            if not FOLD:
                r = (r.to(tl.float32) - 1032.0).to(tl.float16)
        else:
            r = (((h.to(tl.int32) >> (4 * c)) & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            if not FOLD:
                r = (r.to(tl.float32) - 136.0).to(tl.bfloat16)
    return r


@triton.jit
def _k128_tile(acc, x_rows, w_rows, s_cols, n_ok, N, n_groups, gs_shift, k0, k_end,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CPS: tl.constexpr,
               ASM: tl.constexpr, FOLD: tl.constexpr, MASKED: tl.constexpr):
    """acc + x[:, k0:k0+BLOCK_K] @ W[cols, k0:k0+BLOCK_K].T (MASKED: only k < k_end)."""
    dot_dtype: tl.constexpr = x_rows.dtype.element_ty
    GSE: tl.constexpr = 32 * CPS  # inputs per scale inside a block of 128
    G: tl.constexpr = BLOCK_K // GSE  # scale groups (or parts of one) per tile, <= 8
    offs_c = tl.arange(0, 32)
    offs_j = tl.arange(0, 16)
    if FOLD:
        xsum = tl.zeros((BLOCK_M, 16), dtype=tl.float32)  # -136 * sum of x per group column
    for b in tl.static_range(BLOCK_K // 128):
        kb = k0 + 128 * b
        hw = tl.multiple_of(kb // 4, 32)
        if MASKED:
            h = tl.load(w_rows + (hw + offs_c)[None, :], mask=(kb + 0 * offs_c < k_end)[None, :], other=0)
        else:
            h = tl.load(w_rows + (hw + offs_c)[None, :])
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(4):
            kc = tl.multiple_of(kb + 32 * c, 32)
            if MASKED:
                x = tl.load(x_rows + (kc + offs_c)[None, :], mask=(kc + offs_c < k_end)[None, :], other=0.0)
            else:
                x = tl.load(x_rows + (kc + offs_c)[None, :])
            w = _nibble(h, c, dot_dtype, ASM, FOLD)
            # ieee: fp32 activations stay fp32 (no TF32); fp16/bf16 are unaffected.
            part = tl.dot(x, tl.trans(w), part, input_precision="ieee")
            if FOLD:  # the chunk's sum in columns j and j + G of xsum (j: its group in the tile)
                j = (128 * b + 32 * c) // GSE
                ind = tl.where((offs_j[None, :] == j) | (offs_j[None, :] == j + G), -136.0, 0.0).to(dot_dtype)
                xsum = tl.dot(x, ind + tl.zeros((32, 16), dtype=dot_dtype), xsum)
            if c % CPS == CPS - 1:
                g = kc >> gs_shift
                if MASKED:
                    g = tl.minimum(g, n_groups - 1)
                scale = _scale_f32(tl.load(s_cols + g * N, mask=n_ok, other=0.0), ASM)
                acc += part * scale[None, :]
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FOLD:
        # -136 * the fp32 sums as two bf16 parts that add up to them to 16 bits (columns j < G:
        # the first part of group j's sum, G <= j < 2G: the second), times the groups' scale
        # rows: one dot of K = 16 (rows past 2G are zero). The part left out is below 2^-17 of
        # 136 * |sum of x| * scale per group: a fraction of an output ulp unless x's mean over a
        # group is large (tests/test_quant_ops.py: mean 200, still within the bf16 bound).
        hi = xsum.to(dot_dtype)
        lo = (xsum - hi.to(tl.float32)).to(dot_dtype)
        sums = tl.where(offs_j[None, :] < G, hi, lo)
        groups = (k0 + (offs_j % G) * GSE) >> gs_shift
        if MASKED:
            groups = tl.minimum(groups, n_groups - 1)
        scales = tl.load(s_cols[None, :] + groups[:, None] * N,
                         mask=(offs_j < 2 * G)[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(sums, scales, acc)
    return acc


# M (the batch rows) is not specialized: decode batches 1..32 would otherwise compile three
# variants per kernel (M == 1, M % 16 == 0, other); M only bounds the stores.
@triton.jit(do_not_specialize=["M"])
def _w4a16_k128_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, n_groups, gs_shift, k_per_split, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CPS: tl.constexpr,
    ASM: tl.constexpr, FOLD: tl.constexpr,
):
    # w_ptr: the k128 words as int16 [N, stride_wn]; s_ptr: scales [n_groups, N]; the group of
    # input k is k >> gs_shift (31: one group). CPS: 32-input chunks per scale (1, 2, 4: 4 for
    # groups of 128 and more).
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
    # rows past M read row M - 1 and columns past N column N - 1: read, never stored
    x_rows = x_ptr + tl.minimum(row0 + offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    cols = tl.minimum(col0 + offs_n, N - 1)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    n_ok = offs_n < N - col0
    s_cols = s_ptr + col0 + offs_n  # scale rows: masked past N (contiguous, vector loads)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_full, BLOCK_K):
        acc = _k128_tile(acc, x_rows, w_rows, s_cols, n_ok, N, n_groups, gs_shift, k0, k_end,
                         BLOCK_M, BLOCK_N, BLOCK_K, CPS, ASM, FOLD, False)
    if k_full < k_end:  # the ragged end of K: one masked tile
        acc = _k128_tile(acc, x_rows, w_rows, s_cols, n_ok, N, n_groups, gs_shift, k_full, k_end,
                         BLOCK_M, BLOCK_N, BLOCK_K, CPS, ASM, FOLD, True)

    m_ok = offs_m < M - row0
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

# What the JIT sees at the model's shapes: 16-byte aligned tensors; N, K, the row strides of x and
# of the packed words (K / 8), group_size (a multiple of 16: 32, 64, 128), k_per_split (whole
# BLOCK_K) and stride_split (M * N) divisible by 16. The scales' row stride K / group_size is
# divisible by 16 for some layers only (Pixtral-12B: 5120 / 128 = 40 is not, 5120 / 32 = 160 and
# 14336 / 128 = 112 are): both variants are compiled, the second named `..._sn16`.
_ALIGNED_ARGS = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn", "group_size",
                 "k_per_split", "stride_split")
_SCALE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_specs(capability: int) -> list[dict]:
    """Both forms per activation dtype, with scales in the activation dtype (what checkpoints
    hold), the decode form writing fp32 split-K partials and the prefill form the output; each
    with the scales' row stride not divisible by 16 and (`_sn16`) divisible."""
    def signature(dtype, name, out):
        return {"x_ptr": f"*{name}", "w_ptr": "*i32", "s_ptr": f"*{_SCALE_DTYPES[dtype]}", "out_ptr": out,
                "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                "stride_sn": "i32", "stride_sg": "constexpr", "group_size": "i32", "k_per_split": "i32",
                "stride_split": "i32"}

    # stride_sg == 1 (contiguous scales) becomes a constant.
    specs = plan.compile_specs("w4a16", _w4a16_kernel, configs, capability, signature, {"stride_sg": 1},
                               _ALIGNED_ARGS)
    sn16 = plan.compile_specs("w4a16", _w4a16_kernel, configs, capability, signature, {"stride_sg": 1},
                              _ALIGNED_ARGS + ("stride_sn",))
    return specs + [{**spec, "name": spec["name"] + "_sn16"} for spec in sn16] + k128_compile_specs(capability)


# ---------------------------------------------------------------------------------------------
# the k128 kernel: configs, launcher, compile specs

# Under the interpreter: BLOCK_K is one block of 128 (the kernel's unit); tiles small enough
# that test shapes span several in every dimension.
_K128_INTERPRETER = {"decode": plan.cfg(16, 32, 128, 4, 1), "prefill": plan.cfg(32, 32, 128, 4, 1)}


def k128_configs(capability: int, dtype: torch.dtype, cps: int = 4) -> dict[str, dict]:
    """{"decode": ..., "prefill": ...} of the k128 kernel for groups of 32 * cps inputs and more
    (cps = chunks_per_scale). BLOCK_K is a multiple of 128. Decode: 16 rows (batches 17..32 take
    two M tiles, whose programs run side by side and read the weight tile the second time from
    L2), 256 columns on 4 warps, 3 stages; 256 inputs (32 KiB of packed weights) per iteration
    for groups of 128 and more, 128 for smaller groups (their per-group accumulators and scale rows
    would spill at 256): tests/test_sass_ceiling.py reads the sm_90 issue rate of each. Prefill:
    64 x 128 x 128 tiles. fp32 (IEEE dots on the FMA units): small tiles. All compile without
    spills for sm_90, sm_89 and sm_80 (tests/test_quant_compile.py)."""
    if dtype == torch.float32:
        return {"decode": plan.cfg(16, 64, 128, 8, 2), "prefill": plan.cfg(32, 64, 128, 8, 2)}
    return {"decode": plan.cfg(16, 256, 256 if cps == 4 else 128, 4, 3), "prefill": plan.cfg(64, 128, 128, 4, 3)}


def chunks_per_scale(group_size: int, k: int) -> int:
    """32-input chunks of a 128 block that share one scale: 1 (groups of 32), 2 (64), 4 (128 and
    more, per channel)."""
    return 4 if group_size >= 128 or group_size == k else group_size // 32


def k128_fold(x_dtype: torch.dtype, scale_dtype: torch.dtype) -> bool:
    """Whether the kernel folds the nibbles' offset into a correction of the sums (bf16
    activations and scales: the scales are then exact dot operands) rather than subtract it from
    every weight."""
    return x_dtype == torch.bfloat16 and scale_dtype == torch.bfloat16


def w4a16_k128_matmul(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                      split: int | None = None, config: dict | None = None) -> torch.Tensor:
    """x2d [M, K] (unit column stride) @ dequant(W).T -> [M, N] in x2d.dtype, W in the k128 layout
    (pixtral_fast.quant.formats.repack_w4a16_k128): packed int32 [N, Kp/8] (Kp: K rounded up to
    128), scales [K / group_size, N]. Inputs are validated by pixtral_fast.quant.ops. split /
    config (tests, benchmarks) override the K split and the tile config."""
    m, k = x2d.shape
    if config is None and INTERPRETING:
        config = _K128_INTERPRETER["decode" if m <= plan.DECODE_MAX_M else "prefill"]
    gs_shift = group_size.bit_length() - 1 if group_size & (group_size - 1) == 0 else 31
    asm = not INTERPRETING and x2d.dtype != torch.float32
    cps = chunks_per_scale(group_size, k)
    constexprs = {"CPS": cps, "ASM": asm, "FOLD": k128_fold(x2d.dtype, scales.dtype)}
    layout = (packed.shape[1] * 2, scales.shape[0], gs_shift)
    return plan.launch(_w4a16_k128_kernel, x2d, packed.view(torch.int16), scales, packed.shape[0], layout,
                       functools.partial(k128_configs, cps=cps), split, config, constexprs)


def w4a16_k128_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] -> [..., N]; leading dimensions flattened without a copy."""
    return w4a16_k128_matmul(plan.rows(x), packed, scales, group_size).view(*x.shape[:-1], packed.shape[0])


_K128_ALIGNED_ARGS = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn", "k_per_split",
                      "stride_split")


def k128_compile_specs(capability: int) -> list[dict]:
    """The k128 kernel's specs: both forms per activation dtype for groups of 128 and more (CPS 4),
    and the bf16 decode form for groups of 32 and 64 as well (`_c1`, `_c2`); scales in the
    activation dtype, FOLD for bf16, the paired PTX unpacking (ASM) for fp16 and bf16."""
    def signature(dtype, name, out):
        return {"x_ptr": f"*{name}", "w_ptr": "*i16", "s_ptr": f"*{_SCALE_DTYPES[dtype]}", "out_ptr": out,
                "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "n_groups": "i32",
                "gs_shift": "i32", "k_per_split": "i32", "stride_split": "i32",
                "CPS": "constexpr", "ASM": "constexpr", "FOLD": "constexpr"}

    specs = []
    for cps in (4, 2, 1):
        for spec in plan.compile_specs("w4a16k128", _w4a16_k128_kernel, functools.partial(k128_configs, cps=cps),
                                       capability, signature, {"CPS": cps}, _K128_ALIGNED_ARGS):
            name = spec["name"].split("_")[2]
            if cps != 4 and not (name == "bf16" and "_decode_" in spec["name"]):
                continue
            spec["constexprs"] |= {"ASM": name != "fp32", "FOLD": name == "bf16"}
            spec["name"] += "" if cps == 4 else f"_c{cps}"
            specs.append(spec)
    return specs
