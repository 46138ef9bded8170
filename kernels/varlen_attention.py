"""Variable-length (packed) attention forward, FlashAttention-2 style, Triton.

q/k/v hold every sequence back to back ([T, H, D], flash-attn varlen convention). A program owns
one query tile of one sequence for one query head: grid (query tiles of the longest sequence,
sequence, head), so tiny images packed with a 4096-patch one cost only programs that exit at
once. GQA: query head h reads KV head h // (Hq // Hkv); a group's programs run side by side and
share K/V tiles through L2. Keys are walked in two phases: tiles needing no mask, then the
masked ones (the causal diagonal, or the sequence's ragged end); causal tiles past the diagonal
are never visited, and causal query tiles run longest first. Online softmax in fp32, log2
domain; P is rounded to the input dtype before the PV dot (as flash-attn does); fp32 dots are
IEEE.

RoPE-2D (pos given) rotates the Q tile once and each K tile as it is loaded: the rotated q/k
never go to HBM. Angles are pos * inv_freq in fp32, inv_freq from `rope_frequencies.py`
(the oracle's fp32 angles, bit for bit). Rotated tiles are rounded to the input dtype, so the
result is `rope_2d` followed by attention. Each tile is kept as its pairs' even and odd halves
(q.k = q0.k0 + q1.k1: two dots), because re-interleaving them (reshape/join) in front of a dot
operand makes Triton redo the rotation in every warp, which spills on sm_80.

head_dim: any multiple of 8 up to 256. Tiles are HEAD_DIM_P2 wide (the next power of two, at
least tl.dot's 16, or 32 with RoPE's half-width tiles); the padding columns load as zeros and are
never stored, as flash-attention pads its head dims.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import INTERPRETING, LOG2E, TRITON_DTYPE, arch
from pixtral_fast.kernels._specialize import jit_specialized
from pixtral_fast.kernels.rope_2d import pair_frequencies, sincos_small


@triton.jit
def _tile_mask(ok, cols, N_COLS: tl.constexpr, WIDTH: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """Mask of a [len(ok), WIDTH] tile ([WIDTH, len(ok)] for KEY_MAJOR) whose columns past N_COLS
    are padding (head_dim rounded up to a power of two); no column test when nothing is padded."""
    if N_COLS == WIDTH:
        if KEY_MAJOR:
            return ok[None, :]
        else:
            return ok[:, None]
    else:
        if KEY_MAJOR:
            return ok[None, :] & (cols < N_COLS)[:, None]
        else:
            return ok[:, None] & (cols < N_COLS)[None, :]


@triton.jit
def _rotated_pairs(ptr, tokens, tok_ok, stride_t, pos_ptr, stride_pt, stride_pc, freq,
                   KEY_MAJOR: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                   PAIR_WORDS: tl.constexpr):
    """RoPE-2D of rows `tokens` of a [T, D] view: the rotated even and odd elements (x0', x1') of
    every pair, fp32, laid out [tokens, HALF_P2], or [HALF_P2, tokens] for KEY_MAJOR (the B
    operand of q @ k^T); HALF = D/2 pairs, padding pairs are zero. PAIR_WORDS (even strides,
    aligned base): a pair is read as one integer word twice the element's width, so loads stay
    contiguous (coalesced, vectorised, cp.async); otherwise two strided element loads."""
    pair = tl.arange(0, HALF_P2)
    row = tl.load(pos_ptr + tokens * stride_pt, mask=tok_ok, other=0)
    col = tl.load(pos_ptr + tokens * stride_pt + stride_pc, mask=tok_ok, other=0)
    mask = _tile_mask(tok_ok, pair, HALF, HALF_P2, KEY_MAJOR)
    if KEY_MAJOR:
        tok, idx, f = tokens[None, :], pair[:, None], freq[:, None]
        p = tl.where(idx < HALF // 2, row[None, :], col[None, :])
    else:
        tok, idx, f = tokens[:, None], pair[None, :], freq[None, :]
        p = tl.where(idx < HALF // 2, row[:, None], col[:, None])
    dtype = ptr.dtype.element_ty
    if PAIR_WORDS:
        bits: tl.constexpr = dtype.primitive_bitwidth
        word_t = tl.int64 if bits == 32 else tl.int32
        half_t = tl.int32 if bits == 32 else tl.int16
        w = tl.load(ptr.to(tl.pointer_type(word_t)) + tok * (stride_t // 2) + idx, mask=mask, other=0)
        x0 = w.to(half_t).to(dtype, bitcast=True)  # little-endian: element 2i is the low half
        x1 = (w >> bits).to(half_t).to(dtype, bitcast=True)
    else:
        x0 = tl.load(ptr + tok * stride_t + 2 * idx, mask=mask, other=0.0)
        x1 = tl.load(ptr + tok * stride_t + 2 * idx + 1, mask=mask, other=0.0)
    x0 = x0.to(tl.float32)
    x1 = x1.to(tl.float32)
    cos, sin = sincos_small(p.to(tl.float32) * f)
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


@triton.jit
def softmax_update(s, v, acc, m_i, l_i):
    """One online-softmax step (base 2): fold a tile of scores s [M, N] and its values v [N, D]
    into the running max m_i, sum l_i and unnormalised output acc. P goes to v's dtype for the
    second dot, as flash-attention does; fp32 stays IEEE (no TF32)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _attend(acc, m_i, l_i, q0, q1, k_base, v_base, pos_base, freq, offs_m, seq_len, lo, hi,
            stride_kt, stride_vt, stride_pt, stride_pc, qk_scale,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, PAIR_WORDS: tl.constexpr,
            HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + offs_n
        key_ok = keys < seq_len  # all true in the unmasked phase; only the row mask of the loads
        v = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :],
                    mask=_tile_mask(key_ok, offs_d, HEAD_DIM, HEAD_DIM_P2, False), other=0.0)
        if ROPE:
            k0, k1 = _rotated_pairs(k_base, keys, key_ok, stride_kt, pos_base, stride_pt, stride_pc, freq,
                                    True, HEAD_DIM // 2, HEAD_DIM_P2 // 2, PAIR_WORDS)
            s = tl.dot(q0, k0.to(v.dtype), input_precision="ieee")
            s = tl.dot(q1, k1.to(v.dtype), s, input_precision="ieee")
        else:
            k_t = tl.load(k_base + keys[None, :] * stride_kt + offs_d[:, None],
                          mask=_tile_mask(key_ok, offs_d, HEAD_DIM, HEAD_DIM_P2, True), other=0.0)
            s = tl.dot(q0, k_t, input_precision="ieee")
        s = s * qk_scale  # log2 domain
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= offs_m[:, None])
            # Every row keeps a finite max: row i >= tile start sees key `tile start` first.
            s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = softmax_update(s, v, acc, m_i, l_i)
    return acc, m_i, l_i


@triton.jit
def _varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr, pos_ptr, freq_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_pt, stride_pc,
    qk_scale, group,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, PAIR_WORDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
):
    if CAUSAL:  # the last tiles of a causal sequence have the most keys: launch them first
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    seq_len = tl.load(cu_ptr + seq + 1) - start
    m0 = tile * BLOCK_M
    if m0 >= seq_len:
        return

    # Only the sequence's first row needs 64-bit offsets (T x a fused-QKV stride can pass 2^31);
    # offsets inside one sequence stay small.
    row0 = start.to(tl.int64)
    kv_head = head // group
    q_base = q_ptr + row0 * stride_qt + head * stride_qh
    k_base = k_ptr + row0 * stride_kt + kv_head * stride_kh
    v_base = v_ptr + row0 * stride_vt + kv_head * stride_vh
    pos_base = pos_ptr + row0 * stride_pt

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    row_ok = offs_m < seq_len
    tile_ok = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_P2, False)
    if ROPE:
        pairs = tl.arange(0, HEAD_DIM_P2 // 2)
        freq = tl.load(freq_ptr + pairs, mask=pairs < HEAD_DIM // 2, other=0.0)
        q0, q1 = _rotated_pairs(q_base, offs_m, row_ok, stride_qt, pos_base, stride_pt, stride_pc, freq,
                                False, HEAD_DIM // 2, HEAD_DIM_P2 // 2, PAIR_WORDS)
        q0 = q0.to(q_ptr.dtype.element_ty)
        q1 = q1.to(q_ptr.dtype.element_ty)
    else:
        freq = 0.0
        q0 = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=tile_ok, other=0.0)
        q1 = q0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], tl.float32)
    if CAUSAL:  # keys before the tile are all visible; the diagonal block is masked
        free_end = m0
        end = tl.minimum(m0 + BLOCK_M, seq_len)
    else:  # every key visible; only the last, partial tile is masked
        free_end = (seq_len // BLOCK_N) * BLOCK_N
        end = seq_len
    acc, m_i, l_i = _attend(acc, m_i, l_i, q0, q1, k_base, v_base, pos_base, freq, offs_m, seq_len, 0,
                            free_end, stride_kt, stride_vt, stride_pt, stride_pc, qk_scale,
                            False, CAUSAL, ROPE, PAIR_WORDS, HEAD_DIM, HEAD_DIM_P2, BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q0, q1, k_base, v_base, pos_base, freq, offs_m, seq_len, free_end,
                            end, stride_kt, stride_vt, stride_pt, stride_pc, qk_scale,
                            True, CAUSAL, ROPE, PAIR_WORDS, HEAD_DIM, HEAD_DIM_P2, BLOCK_N)

    out = acc / l_i[:, None]  # every row (padding rows too) saw at least one key: l_i > 0
    n_heads = tl.num_programs(2)
    o_rows = (row0 + offs_m) * n_heads + head
    tl.store(out_ptr + o_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# configs

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (arch, 16-bit or fp32, padded head_dim, in-kernel
# RoPE), each compiled causal (and with RoPE where keyed so): no spills, 126-251 registers.
# BLOCK_M is a multiple of BLOCK_N (the causal diagonal starts on a key-tile boundary).
# - Hopper: 128-query tiles over 8 warps (wgmma reads the rotated K tile from shared memory).
#   The ViT (D=64, RoPE) and the decoder prefill (D=128, no RoPE) get two candidates each.
# - Ampere: mma.sync takes the K tile from registers in every warp, so the rotation is repeated
#   per warp and narrow key tiles keep it in registers.
# - fp32 (IEEE dots run on FMA units, operands held whole per thread): small tiles; one config
#   serves with and without RoPE.
# - head_dim 256 (padded from 136..256): fewer query rows than D=128 for the same registers.
#   Padded dims below 64 run the D=64 configs (smaller tiles than they were sized for).
_CANDIDATES = {
    (90, 16, 64, True): [(128, 64, 8, 3), (128, 32, 8, 3)],
    (90, 16, 64, False): [(128, 64, 8, 3), (128, 64, 4, 3)],
    (90, 16, 128, True): [(128, 32, 8, 2)],
    (90, 16, 128, False): [(128, 64, 8, 3), (128, 128, 8, 2)],
    (90, 16, 256, True): [(32, 16, 8, 2)],  # (64, 32): spills
    (90, 16, 256, False): [(64, 32, 8, 2)],  # (64, 64): spills at D=160
    (90, 32, 64, True): [(32, 16, 8, 2)],  # 4 warps: 184 regs on Triton 3.9, spills on 3.6
    (90, 32, 128, True): [(32, 16, 8, 2)],
    (90, 32, 256, True): [(16, 16, 8, 2)],
    (80, 16, 64, True): [(64, 16, 4, 2)],
    (80, 16, 64, False): [(128, 64, 8, 3)],
    (80, 16, 128, True): [(32, 32, 4, 2)],
    (80, 16, 128, False): [(128, 64, 8, 2)],
    (80, 16, 256, True): [(16, 16, 8, 2)],
    (80, 16, 256, False): [(64, 32, 8, 2)],
    (80, 32, 64, True): [(32, 16, 4, 2)],
    (80, 32, 128, True): [(16, 16, 4, 2)],
    (80, 32, 256, True): [(16, 16, 8, 1)],  # 2 stages: 255 registers at D=160
}
# Padded head dims add column masks (a few registers): where a candidate then sits at the
# 255-register limit, the padded dims keep only the others.
_PADDED_CANDIDATES = {
    (90, 16, 64, True): [(128, 32, 8, 3)],
    (90, 16, 64, False): [(128, 64, 8, 3)],
    (90, 16, 128, False): [(128, 64, 8, 3)],
}
_INTERPRETER_CONFIG = (64, 32, 4, 1)  # small enough that CPU tests cross several tiles
MAX_HEAD_DIM = 256


def supports_head_dim(head_dim: int) -> bool:
    """Multiples of 8 up to 256 (padded inside to a power of two, masked, as flash-attn does)."""
    return 8 <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def padded_head_dim(head_dim: int, rope: bool) -> int:
    """The tile width: a power of two; tl.dot needs 16 columns per operand, and with RoPE the
    dots run on half-width (even/odd) tiles, hence 32."""
    return max(32 if rope else 16, triton.next_power_of_2(head_dim))


def _candidates(capability: int, dtype: torch.dtype, head_dim: int, rope: bool) -> list[tuple]:
    arch = 90 if capability >= 90 else 80
    bits = 32 if dtype == torch.float32 else 16
    width = padded_head_dim(head_dim, rope)
    key = (arch, bits, max(64, width), rope or bits == 32)
    if head_dim != width and key in _PADDED_CANDIDATES:
        return _PADDED_CANDIDATES[key]
    return _CANDIDATES[key]


def _as_config(c: tuple) -> triton.Config:
    return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3])


def _prune(configs, named_args, **kwargs):
    """The candidates for this GPU, dtype, head_dim and RoPE flag (the autotuner's key holds
    HEAD_DIM, HEAD_DIM_P2, CAUSAL, ROPE and every tensor's dtype)."""
    q = named_args["q_ptr"]
    wanted = set(_candidates(arch(q.device), q.dtype, kwargs["HEAD_DIM"], kwargs["ROPE"]))
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]


if INTERPRETING:  # its autotuner cannot time several configs
    _kernel = triton.autotune([_as_config(_INTERPRETER_CONFIG)], key=[])(_varlen_fwd_kernel)
else:
    _ALL = sorted({c for cands in _CANDIDATES.values() for c in cands})
    _kernel = triton.autotune([_as_config(c) for c in _ALL], key=["HEAD_DIM", "HEAD_DIM_P2", "CAUSAL", "ROPE"],
                              prune_configs_by={"early_config_prune": _prune})(_varlen_fwd_kernel)


# ---------------------------------------------------------------------------------------------
# launcher

def _pairs_aligned(*views: torch.Tensor) -> bool:
    """Whether every pair (x[2i], x[2i+1]) of these views can be read as one aligned word."""
    word = 2 * views[0].element_size()
    return all(t.data_ptr() % word == 0 and t.stride(0) % 2 == 0 and t.stride(1) % 2 == 0 for t in views)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, pos, rope_theta, config=None):
    """q [T, Hq, D], k/v [T, Hkv, D] (last dim contiguous, other strides free; D a multiple of 8
    up to 256), cu_seqlens int32 [n+1], pos None or int32 [T, 2]. Returns a new contiguous
    [T, Hq, D] in q's dtype. Inputs are validated by pixtral_fast.ops.
    config=(BLOCK_M, BLOCK_N, num_warps, num_stages) bypasses the autotuner (tests run every
    shipped candidate this way)."""
    n_tokens, q_heads, head_dim = q.shape
    if not supports_head_dim(head_dim):
        raise ValueError(f"head_dim {head_dim}: the varlen kernel takes multiples of 8 up to {MAX_HEAD_DIM}")
    out = torch.empty((n_tokens, q_heads, head_dim), dtype=q.dtype, device=q.device)
    n_seqs = cu_seqlens.numel() - 1
    if n_tokens == 0 or max_seqlen == 0 or n_seqs == 0:
        return out
    rope = pos is not None
    freq = pair_frequencies(head_dim, rope_theta, 2, q.device) if rope else cu_seqlens  # unused if not
    pos_arg, stride_pt, stride_pc = (pos, pos.stride(0), pos.stride(1)) if rope else (cu_seqlens, 0, 0)
    args = (q, k, v, out, cu_seqlens, pos_arg, freq,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_pt, stride_pc,
            float(scale) * LOG2E, q_heads // k.shape[1])
    flags = {"HEAD_DIM": head_dim, "HEAD_DIM_P2": padded_head_dim(head_dim, rope), "CAUSAL": bool(causal),
             "ROPE": rope, "PAIR_WORDS": rope and _pairs_aligned(q, k)}

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_seqs, q_heads)

    if config is None:
        _kernel[grid](*args, **flags)
    else:
        block_m, block_n, warps, stages = config
        _varlen_fwd_kernel[grid({"BLOCK_M": block_m})](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                                                        num_warps=warps, num_stages=stages)
    return out


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs


# (head_dim, RoPE) compiled besides the models' 64 and 128 (every dtype, both masking modes): 256
# (its own configs) and padded dims with column masks (40 -> 64, 80 -> 128, 160 -> 256), causal
# only (the masked diagonal phase holds the most live registers), in bf16 (fp16 compiles the same
# code with another element type) and, for the 256 family, fp32 with RoPE (fp32 has one config
# with and without RoPE; without, it needs a third of the registers). Dims padded to 16 or 32 run
# the D=64 configs on narrower tiles: fewer registers than the D=64 variants compiled here.
_EXTRA_VARIANTS = {
    torch.bfloat16: [(d, rope) for d in (256, 160, 80, 40) for rope in (True, False)],
    torch.float32: [(256, True), (160, True)],
    torch.float16: [],
}
# The launches the specs stand for: with RoPE (pos given), Pixtral's vision encoder (16 heads,
# no GQA); without, the text decoder's prefill (32 query / 8 KV heads). q, k, v are the
# contiguous [T, H, D] views that the attention projections return (token stride H * D, head
# stride D), pos is int32 [T, 2] (strides 2 and 1); without RoPE the launcher passes pos
# strides of 0. Other head dims keep the geometry of their RoPE flag.
_SPEC_HEADS = {True: (16, 16), False: (32, 8)}  # (query heads, KV heads)


def _spec_values(head_dim: int, rope: bool) -> dict:
    q_heads, kv_heads = _SPEC_HEADS[rope]
    values = {"stride_qt": q_heads * head_dim, "stride_qh": head_dim,
              "stride_kt": kv_heads * head_dim, "stride_kh": head_dim,
              "stride_vt": kv_heads * head_dim, "stride_vh": head_dim,
              "stride_pt": 2 if rope else 0, "stride_pc": 1 if rope else 0, "group": q_heads // kv_heads}
    return values


def compile_specs(capability: int) -> list[dict]:
    """Every candidate config of the arch, per (dtype, head_dim, RoPE), in both masking modes:
    non-causal is what the ViT launches, causal (its masked diagonal phase holds more live
    registers) what decoder prefill launches; and padded head dims (see _EXTRA_VARIANTS). Each is
    specialized as the JIT specializes it at its launch (jit_specialized, _spec_values): without
    that the loads compile to scalar accesses and the register count says nothing about the
    kernel that really runs."""
    names = _varlen_fwd_kernel.arg_names
    specs = []
    for dtype, name in TRITON_DTYPE.items():
        signature = {a: ("*i32" if a in ("cu_ptr", "pos_ptr") else "*fp32" if a == "freq_ptr" else f"*{name}")
                     for a in names[:7]}
        signature.update({a: "i32" for a in names[7:15]})
        signature.update({"qk_scale": "fp32", "group": "i32"})
        signature.update({a: "constexpr" for a in names[17:]})
        variants = [(d, rope, causal) for d in (64, 128) for rope in (True, False) for causal in (False, True)]
        variants += [(d, rope, True) for d, rope in _EXTRA_VARIANTS[dtype]]
        for head_dim, rope, causal in variants:
            width = padded_head_dim(head_dim, rope)
            for block_m, block_n, warps, stages in _candidates(capability, dtype, head_dim, rope):
                constexprs = {"HEAD_DIM": head_dim, "CAUSAL": causal, "ROPE": rope, "PAIR_WORDS": True,
                              "BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM_P2": width}
                # Without RoPE the launcher passes cu_seqlens for pos and freq (never read).
                sig = signature if rope else {**signature, "freq_ptr": "*i32"}
                specs.append({
                    "name": f"varlen_{name}_d{head_dim}{'_rope' if rope else ''}{'_causal' if causal else ''}"
                            f"_m{block_m}_n{block_n}_w{warps}_s{stages}",
                    "fn": _varlen_fwd_kernel,
                    **jit_specialized(_varlen_fwd_kernel, sig, constexprs, _spec_values(head_dim, rope)),
                    "num_warps": warps, "num_stages": stages,
                })
    return specs
