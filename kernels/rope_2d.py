"""Rotary position embedding on interleaved pairs, Triton: RoPE-2D (the ViT) and 1-D (the decoder).

One launch rotates q and k: the grid's second axis walks q's head blocks, then k's, so GQA
(Hq != Hk) and strided views into a fused QKV output need no extra copies. A program owns
BLOCK_T tokens x BLOCK_H heads, computes each pair's angle once for its tokens and reuses it
across heads. With a paged KV cache (CACHE, 1-D only: the decoder), the same launch also writes
the rotated k and, on a third run of head blocks, v to their cache slots: no separate scatter.

Angles: pos * inv_freq in fp32, with inv_freq passed in precomputed by
`rope_frequencies.py` (shared with the oracle: fp64 on the CPU, rounded once: never a device pow; the fp32 angle
is bit-identical to the oracle's), reordered so that pair i reads entry i. The decoder's angles
reach 1.3e5 rad (position 131071, f[0] = 1), so cos/sin (computed here, no table) reduce them
exactly, in fp64, before a polynomial (_sincos). Any head_dim up to 256 (even; 2-D: a multiple
of 4): tiles are padded to a power of two and the padding columns masked.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import TRITON_DTYPE
from pixtral_fast.kernels.rope_frequencies import rope_frequencies

# pi/2 = HI + LO with HI holding 31 significant bits: q * HI is exact in fp64 for q < 2^22
# (angles up to ~6.5e6 rad, i.e. positions far past the decoder's 131072).
_PIO2_HI = tl.constexpr(float.fromhex("0x1.921fb544p+0"))
_PIO2_LO = tl.constexpr(math.pi / 2 - float.fromhex("0x1.921fb544p+0"))
_TWO_OVER_PI = tl.constexpr(2 / math.pi)


@triton.jit
def _quarter_turns(r, quad):
    """(cos, sin) of quad * pi/2 + r for |r| <= pi/4: Taylor polynomials (truncation < 2e-9,
    below fp32 rounding), then (c, s) rotated by quad quarter turns. Written out rather than
    tl.cos / tl.sin: those lower to libdevice, whose large-argument path keeps a local-memory
    array in the binary (seen on sm_80) and whose accuracy at 1e5 rad depends on the version."""
    r2 = r * r
    s = r + r * r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880))))
    c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
    q = quad.to(tl.int32) & 3
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    return cos, sin


@triton.jit
def _sincos(angle):
    """(cos, sin) of fp32 angles up to ~6e6 rad (the decoder's reach 1.3e5): the reduction by
    pi/2 runs in fp64, where it is exact."""
    a = angle.to(tl.float64)
    quad = tl.floor(a * tl.full([], _TWO_OVER_PI, tl.float64) + 0.5)
    r = a - quad * tl.full([], _PIO2_HI, tl.float64) - quad * tl.full([], _PIO2_LO, tl.float64)
    return _quarter_turns(r.to(tl.float32), quad)


@triton.jit
def sincos_small(a):
    """(cos, sin) of fp32 angles |a| < 1.2e4 rad, all in fp32: cheaper where angles stay small
    (the ViT's: row, col <= 63), e.g. in attention's inner loop. Cody-Waite reduction by pi/2 in
    three parts (n * part exact for n < 2^13)."""
    n = tl.floor(a * 0.6366197723675814 + 0.5)
    r = a - n * 1.5703125
    r = r - n * 4.837512969970703e-4
    r = r - n * 7.549790126404332e-8
    return _quarter_turns(r, n)


@triton.jit
def _block_mask(n_heads, head0, t_ok, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM_P2: tl.constexpr):
    lh = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    mask = t_ok[:, None, None] & (lh < n_heads - head0)[None, :, None]  # broadcast over D by tl.load
    if HEAD_DIM != HEAD_DIM_P2:  # head_dim padded to a power of two: padding columns masked
        mask = mask & (offs_d < HEAD_DIM)[None, None, :]
    return mask


@triton.jit
def _load_block(x_ptr, stride_t, stride_h, t0, head0, mask, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                HEAD_DIM_P2: tl.constexpr):
    lt = tl.arange(0, BLOCK_T)
    lh = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    # 64-bit scalar bases (T x a fused-QKV row stride passes 2^31 in long prefills), 32-bit
    # offsets inside the tile: 64-bit pointer tensors would double the address registers.
    src = x_ptr + t0.to(tl.int64) * stride_t + head0.to(tl.int64) * stride_h
    return tl.load(src + (lt[:, None, None] * stride_t + lh[None, :, None] * stride_h + offs_d[None, None, :]),
                   mask=mask, other=0.0)


@triton.jit
def _store_to_slots(cache_ptr, slot_ptr, y, n_heads, t0, head0, t_ok, mask, HEAD_DIM: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM_P2: tl.constexpr):
    """Token t's heads to row slot_mapping[t] of a cache [slots, n_heads, HEAD_DIM]."""
    lh = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    slots = tl.load(slot_ptr + t0 + tl.arange(0, BLOCK_T), mask=t_ok, other=0)
    dst = cache_ptr + slots.to(tl.int64)[:, None, None] * (n_heads * HEAD_DIM) + head0 * HEAD_DIM
    tl.store(dst + (lh[None, :, None] * HEAD_DIM + offs_d[None, None, :]), y.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_block(x_ptr, o_ptr, cache_ptr, slot_ptr, stride_t, stride_h, n_heads, t0, head0, t_ok, cos, sin,
                  HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                  HEAD_DIM_P2: tl.constexpr, CACHE: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM_P2 // 2
    lt = tl.arange(0, BLOCK_T)
    lh = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    mask = _block_mask(n_heads, head0, t_ok, HEAD_DIM, BLOCK_H, HEAD_DIM_P2)
    x = _load_block(x_ptr, stride_t, stride_h, t0, head0, mask, BLOCK_T, BLOCK_H, HEAD_DIM_P2).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, HALF, 2]))
    c = cos[:, None, :]
    s = sin[:, None, :]
    y = tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), [BLOCK_T, BLOCK_H, HEAD_DIM_P2])
    dst = o_ptr + (t0.to(tl.int64) * n_heads + head0) * HEAD_DIM
    tl.store(dst + ((lt[:, None, None] * n_heads + lh[None, :, None]) * HEAD_DIM + offs_d[None, None, :]),
             y.to(o_ptr.dtype.element_ty), mask=mask)
    if CACHE:
        _store_to_slots(cache_ptr, slot_ptr, y, n_heads, t0, head0, t_ok, mask, HEAD_DIM, BLOCK_T, BLOCK_H,
                        HEAD_DIM_P2)


@triton.jit
def _rope_heads(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, freq_ptr, kc_ptr, slot_ptr, n_tokens, q_heads, k_heads,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_pt, stride_pc, n_q_blocks, pid_h, t0, t_ok,
                AXES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                HEAD_DIM_P2: tl.constexpr, CACHE: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, HEAD_DIM_P2 // 2)
    # already in pair order (see pair_frequencies); padding pairs turn by 0 and are not stored
    if HEAD_DIM == HEAD_DIM_P2:
        freq = tl.load(freq_ptr + offs_p)
    else:
        freq = tl.load(freq_ptr + offs_p, mask=offs_p < HALF, other=0.0)
    if AXES == 2:
        row = tl.load(pos_ptr + offs_t * stride_pt, mask=t_ok, other=0)
        col = tl.load(pos_ptr + offs_t * stride_pt + stride_pc, mask=t_ok, other=0)
        p = tl.where(offs_p[None, :] < HALF // 2, row[:, None], col[:, None])
    else:
        p = tl.load(pos_ptr + offs_t * stride_pt, mask=t_ok, other=0)[:, None]
    angle = p.to(tl.float32) * freq[None, :]  # the oracle's fp32 product, bit for bit

    cos, sin = _sincos(angle)

    if pid_h < n_q_blocks:
        _rotate_block(q_ptr, qo_ptr, kc_ptr, slot_ptr, stride_qt, stride_qh, q_heads, t0, pid_h * BLOCK_H, t_ok,
                      cos, sin, HEAD_DIM, BLOCK_T, BLOCK_H, HEAD_DIM_P2, False)
    else:
        _rotate_block(k_ptr, ko_ptr, kc_ptr, slot_ptr, stride_kt, stride_kh, k_heads, t0,
                      (pid_h - n_q_blocks) * BLOCK_H, t_ok, cos, sin, HEAD_DIM, BLOCK_T, BLOCK_H, HEAD_DIM_P2, CACHE)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, freq_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    n_tokens, q_heads, k_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_pt, stride_pc,
    stride_vt, stride_vh, n_q_blocks, n_k_blocks,
    AXES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr, CACHE: tl.constexpr,
):
    pid_h = tl.program_id(1)
    t0 = tl.program_id(0) * BLOCK_T
    t_ok = t0 + tl.arange(0, BLOCK_T) < n_tokens
    if CACHE and pid_h >= n_q_blocks + n_k_blocks:  # v: copied to its cache slots as it is
        head0 = (pid_h - n_q_blocks - n_k_blocks) * BLOCK_H
        mask = _block_mask(k_heads, head0, t_ok, HEAD_DIM, BLOCK_H, HEAD_DIM_P2)
        v = _load_block(v_ptr, stride_vt, stride_vh, t0, head0, mask, BLOCK_T, BLOCK_H, HEAD_DIM_P2)
        _store_to_slots(vc_ptr, slot_ptr, v, k_heads, t0, head0, t_ok, mask, HEAD_DIM, BLOCK_T, BLOCK_H, HEAD_DIM_P2)
    else:
        _rope_heads(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, freq_ptr, kc_ptr, slot_ptr, n_tokens, q_heads, k_heads,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_pt, stride_pc, n_q_blocks, pid_h, t0, t_ok,
                    AXES, HEAD_DIM, BLOCK_T, BLOCK_H, HEAD_DIM_P2, CACHE)


# ---------------------------------------------------------------------------------------------
# launcher

_FREQ_CACHE: dict[tuple, torch.Tensor] = {}


def pair_frequencies(head_dim: int, theta: float, axes: int, device: torch.device) -> torch.Tensor:
    """The frequency of each pair i, in pair order: f for 1-D; for 2-D the rows' f[0::2] then
    the columns' f[1::2] (DESIGN §1), so the kernel needs no index arithmetic."""
    key = (head_dim, float(theta), axes, device)
    freq = _FREQ_CACHE.get(key)
    if freq is None:
        f = rope_frequencies(head_dim, theta, device)
        freq = f if axes == 1 else torch.cat([f[0::2], f[1::2]])
        freq = _FREQ_CACHE.setdefault(key, freq.contiguous())
    return freq


MAX_HEAD_DIM = 256


def supports_head_dim(head_dim: int, axes: int) -> bool:
    """Any head_dim up to 256 that the rotation is defined for: even (1-D), a multiple of 4 (2-D:
    rows and columns get half the pairs each). Padded inside to a power of two, masked."""
    return 0 < head_dim <= MAX_HEAD_DIM and head_dim % (2 * axes) == 0


def padded_head_dim(head_dim: int) -> int:
    return max(4, triton.next_power_of_2(head_dim))


def _config(head_dim: int) -> dict:
    """~4K elements per program: 8 heads (every model here has a multiple of 8) x 8 tokens at
    D=64, x 4 tokens at D=128, x 2 at D=256. Memory-bound, so 4 warps, one stage; Hopper and
    Ampere alike."""
    width = padded_head_dim(head_dim)
    return {"BLOCK_T": max(1, 4096 // (8 * width)), "BLOCK_H": 8, "num_warps": 4, "num_stages": 1,
            "HEAD_DIM_P2": width}


def apply_rope(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float, axes: int,
               cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """q [T, Hq, D], k [T, Hk, D] (last dim contiguous, other strides free); pos int32 [T, 2]
    (axes=2: row, col) or [T] (axes=1). Returns new contiguous (q_rot, k_rot). cache (1-D only):
    (v [T, Hk, D], k_cache, v_cache [blocks, block_size, Hk, D] contiguous, slot_mapping int64
    [T]): k_rot and v are also written to those flat slots. Inputs are validated by
    pixtral_fast.ops."""
    if axes not in (1, 2):
        raise ValueError(f"axes must be 1 or 2, got {axes}")
    n_tokens, q_heads, head_dim = q.shape
    if not supports_head_dim(head_dim, axes):
        raise ValueError(f"head_dim {head_dim}: the {axes}-D RoPE kernel takes multiples of {2 * axes} "
                         f"up to {MAX_HEAD_DIM}")
    k_heads = k.shape[1]
    q_out = torch.empty((n_tokens, q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((n_tokens, k_heads, head_dim), dtype=k.dtype, device=k.device)
    if n_tokens == 0:
        return q_out, k_out
    if cache is not None and axes != 1:
        raise ValueError("the KV-cache write is for the decoder's 1-D RoPE")
    cfg = _config(head_dim)
    freq = pair_frequencies(head_dim, theta, axes, q.device)
    n_q_blocks = triton.cdiv(q_heads, cfg["BLOCK_H"])
    n_k_blocks = triton.cdiv(k_heads, cfg["BLOCK_H"])
    v, k_cache, v_cache, slots = cache if cache is not None else (k, k, k, pos)  # unread without CACHE
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_T"]), n_q_blocks + n_k_blocks * (2 if cache is not None else 1))
    stride_pc = pos.stride(1) if axes == 2 else 0
    _rope_kernel[grid](
        q, k, q_out, k_out, pos, freq, v, k_cache, v_cache, slots,
        n_tokens, q_heads, k_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        pos.stride(0), stride_pc, v.stride(0), v.stride(1), n_q_blocks, n_k_blocks,
        AXES=axes, HEAD_DIM=head_dim, BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"],
        HEAD_DIM_P2=cfg["HEAD_DIM_P2"], CACHE=cache is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return q_out, k_out


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs

# What the JIT specializes for the models' tensors (aligned, head and token strides multiples of
# 16 elements): the variant that runs. Odd strides give an unhinted variant (scalar loads).
_ALIGNED_ARGS = ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "pos_ptr", "freq_ptr", "v_ptr", "kc_ptr", "vc_ptr",
                 "slot_ptr", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")


def compile_specs(capability: int) -> list[dict]:
    """Every shipped config: per dtype, 2-D RoPE at D=64 (the ViT) and D=128, 1-D RoPE at D=128
    (the decoder) and D=64, each 1-D one also with the KV-cache write; in bf16 and fp32 also 1-D
    at 256 (2 tokens a program) and padded head dims (masked columns: 2-D at 80, and 1-D at 40,
    whose strides are not multiples of 16). fp16 compiles the bf16 code with another element
    type. The config does not depend on the arch."""
    specs = []
    for dtype, name in TRITON_DTYPE.items():
        ptr = f"*{name}"
        extra = () if dtype == torch.float16 else ((1, 256), (2, 80), (1, 40))
        for axes, head_dim in ((2, 64), (2, 128), (1, 64), (1, 128)) + extra:
            cfg = _config(head_dim)
            aligned = _ALIGNED_ARGS if head_dim % 16 == 0 else _ALIGNED_ARGS[:10]
            for cache in (False, True) if axes == 1 else (False,):
                specs.append({
                    "name": f"rope{axes}d_{name}_d{head_dim}{'_kv_cache' if cache else ''}",
                    "fn": _rope_kernel,
                    "signature": {
                        "q_ptr": ptr, "k_ptr": ptr, "qo_ptr": ptr, "ko_ptr": ptr, "pos_ptr": "*i32",
                        "freq_ptr": "*fp32", "v_ptr": ptr, "kc_ptr": ptr, "vc_ptr": ptr, "slot_ptr": "*i64",
                        "n_tokens": "i32", "q_heads": "i32", "k_heads": "i32",
                        "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32",
                        "stride_pt": "i32", "stride_pc": "i32", "stride_vt": "i32", "stride_vh": "i32",
                        "n_q_blocks": "i32", "n_k_blocks": "i32",
                        "AXES": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr",
                        "BLOCK_H": "constexpr", "HEAD_DIM_P2": "constexpr", "CACHE": "constexpr",
                    },
                    "constexprs": {"AXES": axes, "HEAD_DIM": head_dim, "BLOCK_T": cfg["BLOCK_T"],
                                   "BLOCK_H": cfg["BLOCK_H"], "HEAD_DIM_P2": cfg["HEAD_DIM_P2"], "CACHE": cache},
                    "attrs": {arg: [["tt.divisibility", 16]] for arg in aligned},
                    "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                })
    return specs
