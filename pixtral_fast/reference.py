"""Plain-PyTorch oracles for every op in pixtral_fast.ops: same signatures, no tricks.

Each computes in fp32 (fp64 when given fp64) and returns the input dtype, so that the same
function is the test oracle (fed fp64 inputs) and the readable baseline of the benchmarks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pixtral_fast.kernels.rope_frequencies import rope_frequencies  # the kernels' table, bit for bit
# The quantized linears' twins: dequantize, then matmul (pixtral_fast/quant/reference.py).
from pixtral_fast.quant.reference import fp8_linear, w4a16_linear  # noqa: F401

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def rope_2d_angles(pos: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angle of every interleaved pair: [tokens, head_dim/2]. Pair i < head_dim/4 turns by
    row * f[2i]; pair i >= head_dim/4 by col * f[2(i - head_dim/4) + 1]."""
    f = rope_frequencies(head_dim, theta, pos.device)
    row, col = pos[:, 0:1].float(), pos[:, 1:2].float()
    return torch.cat([row * f[0::2], col * f[1::2]], dim=-1)


def rope_1d_angles(pos: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angle of every interleaved pair for 1-D positions: [tokens, head_dim/2]."""
    return pos.float()[:, None] * rope_frequencies(head_dim, theta, pos.device)[None, :]


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of x [tokens, heads, D] by angles [tokens, D/2]."""
    x_f = _wide(x).unflatten(-1, (-1, 2))
    x0, x1 = x_f[..., 0], x_f[..., 1]
    angles = angles.to(x_f.dtype)  # fp32 angles (the op's), their cos/sin in fp64 for an fp64 oracle
    cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def rope_2d(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0):
    angles = rope_2d_angles(pos, q.shape[-1], theta)
    return rotate_pairs(q, angles), rotate_pairs(k, angles)


def rope_1d(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float = 1e9):
    angles = rope_1d_angles(pos, q.shape[-1], theta)
    return rotate_pairs(q, angles), rotate_pairs(k, angles)


# Scores held at once by `attention`: [heads, query chunk, keys] elements (32 MiB in fp32), so
# memory grows linearly with the sequence (a 20k-token prompt would need 51 GB for whole fp32
# score matrices of NeMo's 32 heads).
SCORE_ELEMENTS = 1 << 23


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              query_chunk: int | None = None) -> torch.Tensor:
    """q [Lq, H, D], k/v [Lk, Hkv, D] -> [Lq, H, D], widened (fp32, fp64 for fp64 inputs). GQA:
    query head h reads KV head h // (H / Hkv). Causal masks are aligned bottom-right (the last
    query sees every key), as in flash-attn. Queries are taken query_chunk at a time (default:
    as many as fit SCORE_ELEMENTS); each query's softmax still sees all its keys at once, so
    the chunk size changes nothing but memory."""
    lq, heads, dim = q.shape
    lk, kv_heads = k.shape[0], k.shape[1]
    group = heads // kv_heads
    if query_chunk is None:
        query_chunk = max(1, SCORE_ELEMENTS // max(1, heads * lk))
    k, v = _wide(k), _wide(v)
    out = torch.empty(lq, heads, dim, dtype=k.dtype, device=q.device)
    for q0 in range(0, lq, query_chunk):
        qc = _wide(q[q0:q0 + query_chunk]).unflatten(1, (kv_heads, group))  # [C, Hkv, G, D]
        scores = torch.einsum("qhgd,khd->hgqk", qc, k) * scale
        if causal:
            rows = torch.arange(q0, q0 + qc.shape[0], device=q.device)[:, None]
            keep = torch.arange(lk, device=q.device)[None, :] <= rows + (lk - lq)
            scores = scores.masked_fill(~keep, float("-inf"))
        out[q0:q0 + qc.shape[0]] = torch.einsum("hgqk,khd->qhgd", scores.softmax(dim=-1), v).flatten(1, 2)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, causal=False, pos=None,
                     rope_theta=10000.0, *, validate_indices=True):
    """Attention within each packed sequence of q/k/v [total, heads, D], one sequence at a time.
    validate_indices: accepted for signature parity with ops, and ignored."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if pos is not None:
        q, k = rope_2d(q, k, pos, rope_theta)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = attention(q[start:end], k[start:end], v[start:end], scale, causal).to(q.dtype)
    return out


def gemv(x: torch.Tensor, w: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
    """x @ w.T, accumulated wide and rounded to x.dtype once; split_k is accepted for parity."""
    return (_wide(x) @ _wide(w).T).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T as torch computes it (the model's dense projections on the reference backend)."""
    return F.linear(x, w)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up computed wide, rounded once to gate.dtype."""
    return (F.silu(_wide(gate)) * _wide(up)).to(gate.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps), computed wide and rounded to x.dtype, then times the weight
    (the product rounded once more): the decoder's and the ViT's RMSNorm."""
    xf = _wide(x)
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (_wide(normed) * _wide(weight)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(h, weight, eps), h) with h = x + residual rounded to x.dtype: a residual add and
    the norm that follows it."""
    h = (_wide(x) + _wide(residual)).to(x.dtype)
    return rms_norm(h, weight, eps), h


def rope_1d_kv_cache(q, k, v, pos, theta, k_cache, v_cache, slot_mapping, *, validate_indices=True):
    """rope_1d(q, k, pos, theta), and the rotated k and v written to the paged caches at the flat
    slots slot_mapping (int64 [T]) in place; returns (q_rot, k_rot). validate_indices: accepted
    for signature parity with ops (index_copy_ checks the slots itself)."""
    q_rot, k_rot = rope_1d(q, k, pos, theta)
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k_rot)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)
    return q_rot, k_rot


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def gated_ffn(x, w_gate, w_up, w_down, activation: str = "silu"):
    """w_down(act(x @ w_gate.T) * (x @ w_up.T)); the intermediate is rounded to x.dtype, as the
    fused kernel stores it."""
    xf = _wide(x)
    hidden = apply_activation(xf @ _wide(w_gate).T, activation) * (xf @ _wide(w_up).T)
    return (_wide(hidden.to(x.dtype)) @ _wide(w_down).T).to(x.dtype)


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence from a paged cache [blocks, block_size, Hkv, D]."""
    block_size = cache.shape[1]
    n_blocks = -(-seq_len // block_size)
    return cache[block_table_row[:n_blocks].long()].flatten(0, 1)[:seq_len]


def gqa_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale=None, *, validate_indices=True):
    """One query token per sequence, q [B, H, D], over its paged K/V history. validate_indices is
    accepted for signature parity with ops and ignored: the oracle trusts its inputs."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        k = gather_paged(k_cache, block_table[b], n)
        v = gather_paged(v_cache, block_table[b], n)
        out[b] = attention(q[b:b + 1], k, v, scale, causal=False)[0].to(q.dtype)
    return out
