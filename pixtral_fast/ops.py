"""Public fast ops. Each validates its inputs once, at this boundary (ValueError naming the
argument), then calls a torch.library custom op (`pixtral_fast::*`, with a fake impl so that
torch.compile and CUDA-graph capture see through it) whose impl launches our kernels:
the CUDA extension where it exists (decode attention), else the Triton kernel.

These ops never fall back silently to slow code: on a CPU tensor they need Triton's interpreter
(TRITON_INTERPRET=1); otherwise use `pixtral_fast.reference`, whose functions share these
signatures (the model's backend="auto" makes that choice and says so). The one exception is a
head_dim the kernels do not take (attention: multiples of 8 up to 256; RoPE: even, up to 256):
the op then runs its reference twin, and says so once in the "pixtral_fast" log.

Every launch happens on its tensors' device (`torch.cuda.device(...)` around it), whatever the
current device is.
"""
from __future__ import annotations

import logging

import torch

from pixtral_fast import _cuda_decode, reference
from pixtral_fast._validation import FLOAT_DTYPES
from pixtral_fast._validation import check_tensor as _tensor
from pixtral_fast._validation import interpreter_active, kernels_can_run  # noqa: F401  (public here)
from pixtral_fast._validation import on_device as _on_device
from pixtral_fast._validation import positive_real as _positive_real
from pixtral_fast._validation import runnable as _runnable
from pixtral_fast._validation import same_place as _same
from pixtral_fast.kernels import decode_attention as _decode
from pixtral_fast.kernels import gated_ffn as _ffn
from pixtral_fast.kernels import rope_2d as _rope
from pixtral_fast.kernels import varlen_attention as _attn
# The weight-quantized linears (compressed-tensors W4A16 and FP8), defined with their validation
# in pixtral_fast/quant/ops.py to keep this file to the dense ops; public here.
from pixtral_fast.quant.ops import fp8_linear, w4a16_linear  # noqa: F401
# The decode step's row-wise ops and the dense linear dispatch (pixtral_fast/decode_ops.py); public here.
from pixtral_fast.decode_ops import (GEMV_MAX_ROWS, add_rms_norm, gemv, linear, rms_norm,  # noqa: F401
                                     silu_mul, use_gemv)

MAX_HEAD_DIM = _attn.MAX_HEAD_DIM
CUDA_DECODE_HEAD_DIMS = (64, 128)  # csrc/decode_plan.h dispatches these two only
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACTIVATIONS = reference.ACTIVATIONS


log = logging.getLogger("pixtral_fast")


def attention_head_dim_ok(head_dim: int) -> bool:
    """Whether the attention kernels (varlen prefill, paged decode) take this head_dim."""
    return _attn.supports_head_dim(head_dim)


def decode_backend(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                   head_dim: int | None = None) -> str:
    """Which implementation gqa_decode_attention launches: 'cuda' (the C++ extension: fp16/bf16 on
    a GPU, head_dim 64 or 128, when built), 'triton' (the Triton twin: other dtypes and head dims
    that are multiples of 8 up to 256) or 'reference' (any other head_dim). head_dim=None: the
    choice for a head_dim both kernels take."""
    if head_dim is not None and not attention_head_dim_ok(head_dim):
        return "reference"
    device = torch.device(device)
    cuda_dim = head_dim is None or head_dim in CUDA_DECODE_HEAD_DIMS
    eligible = device.type == "cuda" and dtype != torch.float32 and cuda_dim
    return "cuda" if eligible and _cuda_decode.available(device) else "triton"  # self-checked per device


_fallbacks_logged: set[tuple[str, int]] = set()


def _reference_fallback(op: str, head_dim: int, supported: str):
    """The reference twin of `op`, after one log line (per op and head_dim) saying why."""
    if (op, head_dim) not in _fallbacks_logged:
        _fallbacks_logged.add((op, head_dim))
        log.warning("pixtral_fast.ops.%s: head_dim %d is not one the kernels take (%s); running "
                    "pixtral_fast.reference.%s instead (slow)", op, head_dim, supported, op)
    return getattr(reference, op)


# ---------------------------------------------------------------------------------------------
# validation helpers


def _head_dim(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has head_dim 0")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_rope_pair(q, k, pos, pos_cols: int | None):
    _tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    _tensor("k", k, ndim=3)
    _same("k", k, "q", q)
    _runnable("q", q)
    _head_dim("q", q)
    _head_dim("k", k)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in tokens and head_dim")
    shape = (q.shape[0],) if pos_cols is None else (q.shape[0], pos_cols)
    _tensor("pos", pos, dtypes=(torch.int32,))
    _same("pos", pos, "q", q, dtype=False)
    if tuple(pos.shape) != shape:
        raise ValueError(f"pos must have shape {shape} (int32), got {tuple(pos.shape)}")


# ---------------------------------------------------------------------------------------------
# RoPE


@torch.library.custom_op("pixtral_fast::rope_2d", mutates_args=())
def _rope_2d_op(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(q):
        return _rope.apply_rope(q, k, pos, theta, axes=2)


@torch.library.custom_op("pixtral_fast::rope_1d", mutates_args=())
def _rope_1d_op(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(q):
        return _rope.apply_rope(q, k, pos, theta, axes=1)


@_rope_2d_op.register_fake
@_rope_1d_op.register_fake
def _(q, k, pos, theta):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def rope_2d(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0):
    """RoPE-2D on interleaved pairs; q [T, Hq, D], k [T, Hk, D], pos int32 [T, 2] = (row, col)."""
    _check_rope_pair(q, k, pos, 2)
    theta = _positive_real("theta", theta)
    if q.shape[-1] % 4:
        raise ValueError(f"q head_dim {q.shape[-1]} must be a multiple of 4 for RoPE-2D")
    if not _rope.supports_head_dim(q.shape[-1], 2):
        return _reference_fallback("rope_2d", q.shape[-1], f"up to {_rope.MAX_HEAD_DIM}")(q, k, pos, theta)
    return _rope_2d_op(q, k, pos, theta)


def rope_1d(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float = 1e9):
    """RoPE on interleaved pairs for 1-D positions (the decoder); pos int32 [T]."""
    _check_rope_pair(q, k, pos, None)
    theta = _positive_real("theta", theta)
    if q.shape[-1] % 2:
        raise ValueError(f"q head_dim {q.shape[-1]} must be even for RoPE (it rotates pairs)")
    if not _rope.supports_head_dim(q.shape[-1], 1):
        return _reference_fallback("rope_1d", q.shape[-1], f"up to {_rope.MAX_HEAD_DIM}")(q, k, pos, theta)
    return _rope_1d_op(q, k, pos, theta)


@torch.library.custom_op("pixtral_fast::rope_1d_kv_cache", mutates_args=("k_cache", "v_cache"))
def _rope_1d_kv_cache_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, theta: float,
                         k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(q):
        return _rope.apply_rope(q, k, pos, theta, axes=1, cache=(v, k_cache, v_cache, slot_mapping))


@_rope_1d_kv_cache_op.register_fake
def _(q, k, v, pos, theta, k_cache, v_cache, slot_mapping):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def rope_1d_kv_cache(q, k, v, pos, theta, k_cache, v_cache, slot_mapping, *, validate_indices=True):
    """rope_1d(q, k, pos, theta), with the rotated k and v written in the same launch to the paged
    caches [blocks, block_size, Hk, D] at the flat slots slot_mapping (int64 [T]). Returns
    (q_rot, k_rot). validate_indices=False skips the host read of the slots' range (callers that
    own the cache, inside a CUDA graph)."""
    _check_rope_pair(q, k, pos, None)
    theta = _positive_real("theta", theta)
    if q.shape[-1] % 2:
        raise ValueError(f"q head_dim {q.shape[-1]} must be even for RoPE (it rotates pairs)")
    _tensor("v", v, ndim=3)
    _same("v", v, "k", k)
    _head_dim("v", v)
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(name, cache, ndim=4)
        _same(name, cache, "k", k)
        if cache.shape[2:] != k.shape[1:] or not cache.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [blocks, block_size, {k.shape[1]}, {k.shape[2]}], "
                             f"got shape {tuple(cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must have k_cache's shape {tuple(k_cache.shape)}")
    _tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,))
    _same("slot_mapping", slot_mapping, "q", q, dtype=False)
    if slot_mapping.shape[0] != q.shape[0] or slot_mapping.stride(0) != 1:
        raise ValueError(f"slot_mapping must be a contiguous int64 [{q.shape[0]}], got {tuple(slot_mapping.shape)}")
    if validate_indices and not _capturing() and slot_mapping.numel():
        slots = k_cache.shape[0] * k_cache.shape[1]
        low, high = slot_mapping.min().item(), slot_mapping.max().item()
        if low < 0 or high >= slots:
            raise ValueError(f"slot_mapping holds slots {low}..{high}, outside the caches' 0..{slots - 1}")
    if not _rope.supports_head_dim(q.shape[-1], 1):
        fallback = _reference_fallback("rope_1d_kv_cache", q.shape[-1], f"up to {_rope.MAX_HEAD_DIM}")
        return fallback(q, k, v, pos, theta, k_cache, v_cache, slot_mapping)
    return _rope_1d_kv_cache_op(q, k, v, pos, theta, k_cache, v_cache, slot_mapping)


# ---------------------------------------------------------------------------------------------
# Variable-length attention


@torch.library.custom_op("pixtral_fast::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, scale: float, causal: bool, pos: torch.Tensor | None,
                         rope_theta: float) -> torch.Tensor:
    with _on_device(q):
        return _attn.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, pos, rope_theta)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, pos, rope_theta):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, causal=False, pos=None,
                     rope_theta=10000.0, *, validate_indices=True):
    """Attention inside each packed sequence (flash-attn varlen convention); GQA when k/v have
    fewer heads; `pos` given: RoPE-2D applied to q and k inside the kernel.
    validate_indices=False skips the host-side check of cu_seqlens (it syncs), for callers that
    built it on the host themselves; it is skipped anyway during graph capture."""
    _tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    _runnable("q", q)
    _head_dim("q", q)
    for name, t in (("k", k), ("v", v)):
        _tensor(name, t, ndim=3)
        _same(name, t, "q", q)
        _head_dim(name, t)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in tokens and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    _tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    _same("cu_seqlens", cu_seqlens, "q", q, dtype=False)
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least [0, total_tokens]")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if validate_indices and not _capturing():
        bounds = cu_seqlens.cpu()
        lengths = bounds[1:] - bounds[:-1]
        if bounds[0] != 0 or bounds[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at total_tokens={q.shape[0]}, "
                             f"got {bounds[0].item()}..{bounds[-1].item()}")
        if (lengths < 0).any():
            raise ValueError("cu_seqlens must be non-decreasing")
        if lengths.max().item() > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence "
                             f"({lengths.max().item()})")
    if pos is not None:
        _tensor("pos", pos, ndim=2, dtypes=(torch.int32,))
        _same("pos", pos, "q", q, dtype=False)
        if tuple(pos.shape) != (q.shape[0], 2):
            raise ValueError(f"pos must have shape ({q.shape[0]}, 2), got {tuple(pos.shape)}")
        if q.shape[-1] % 4:
            raise ValueError(f"q head_dim {q.shape[-1]} must be a multiple of 4 for RoPE-2D (pos given)")
    scale = q.shape[-1] ** -0.5 if scale is None else _positive_real("scale", scale)
    rope_theta = _positive_real("rope_theta", rope_theta)
    if not attention_head_dim_ok(q.shape[-1]):
        fallback = _reference_fallback("varlen_attention", q.shape[-1], f"multiples of 8 up to {MAX_HEAD_DIM}")
        return fallback(q, k, v, cu_seqlens, max_seqlen, scale, bool(causal), pos, rope_theta)
    return _varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, scale, bool(causal), pos, rope_theta)


# ---------------------------------------------------------------------------------------------
# Gated FFN


@torch.library.custom_op("pixtral_fast::gated_ffn", mutates_args=())
def _gated_ffn_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  activation: str) -> torch.Tensor:
    with _on_device(x):
        return _ffn.gated_ffn(x, w_gate, w_up, w_down, activation)


@_gated_ffn_op.register_fake
def _(x, w_gate, w_up, w_down, activation):
    return x.new_empty(x.shape[:-1] + (w_down.shape[0],))


def gated_ffn(x, w_gate, w_up, w_down, activation="silu"):
    """w_down(act(x @ w_gate.T) * (x @ w_up.T)); x [..., dim], weights [out, in]."""
    _tensor("x", x, dtypes=FLOAT_DTYPES)
    _runnable("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be [..., dim], got shape {tuple(x.shape)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        _tensor(name, w, ndim=2)
        _same(name, w, "x", x)
        if not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if w_gate.shape != w_up.shape or w_gate.shape[1] != x.shape[-1]:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must both be "
                         f"[hidden, {x.shape[-1]}]")
    if w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(f"w_down {tuple(w_down.shape)} must be [out, {w_gate.shape[0]}]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    return _gated_ffn_op(x, w_gate, w_up, w_down, activation)


# ---------------------------------------------------------------------------------------------
# Paged GQA decode attention


@torch.library.custom_op("pixtral_fast::gqa_decode_attention", mutates_args=())
def _gqa_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    with _on_device(q):
        if decode_backend(q.device, q.dtype, q.shape[-1]) == "cuda":
            return _cuda_decode.gqa_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale)
        return _decode.gqa_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale)


@_gqa_decode_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def gqa_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale=None, *, validate_indices=True):
    """One query token per sequence over a paged KV cache. q [B, Hq, D]; caches
    [num_blocks, block_size, Hkv, D]; block_table int32 [B, max_blocks]; seq_lens int32 [B].
    validate_indices=False skips the host-side check of seq_lens/block ids (it syncs), for
    callers that validated them once per step; it is skipped anyway during graph capture."""
    _tensor("q", q, ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    _runnable("q", q)
    _head_dim("q", q)
    if not q.is_contiguous():
        raise ValueError("q must be contiguous")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(name, c, ndim=4)
        _same(name, c, "q", q)
        if not c.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if head_dim != q.shape[2]:
        raise ValueError(f"k_cache head_dim {head_dim} != q head_dim {q.shape[2]}")
    if q.shape[1] % kv_heads:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k_cache heads ({kv_heads})")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"k_cache block_size {block_size} must be one of {BLOCK_SIZES}")
    batch = q.shape[0]
    _tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    _tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        _same(name, t, "q", q, dtype=False)
        if t.shape[0] != batch:
            raise ValueError(f"{name} has {t.shape[0]} rows but q has batch {batch}")
    if not block_table.is_contiguous() or not seq_lens.is_contiguous():
        raise ValueError("block_table and seq_lens must be contiguous")
    if validate_indices and not _capturing():
        _check_pages(block_table.cpu(), seq_lens.cpu(), num_blocks, block_size)
    scale = head_dim ** -0.5 if scale is None else _positive_real("scale", scale)
    if not attention_head_dim_ok(head_dim):
        fallback = _reference_fallback("gqa_decode_attention", head_dim, f"multiples of 8 up to {MAX_HEAD_DIM}")
        return fallback(q, k_cache, v_cache, block_table, seq_lens, scale)
    return _gqa_decode_op(q, k_cache, v_cache, block_table, seq_lens, scale)


def _check_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int, block_size: int) -> None:
    if seq_lens.numel() and seq_lens.min().item() < 1:
        raise ValueError(f"seq_lens must be >= 1, got {seq_lens.min().item()}")
    capacity = block_table.shape[1] * block_size
    if seq_lens.numel() and seq_lens.max().item() > capacity:
        raise ValueError(f"seq_lens has {seq_lens.max().item()} tokens but block_table holds at most "
                         f"{block_table.shape[1]} blocks x {block_size} = {capacity}")
    used = torch.arange(block_table.shape[1])[None, :] * block_size < seq_lens[:, None]
    ids = block_table[used]
    if ids.numel() and (ids.min().item() < 0 or ids.max().item() >= num_blocks):
        raise ValueError(f"block_table references block ids outside [0, {num_blocks}) "
                         f"(min {ids.min().item()}, max {ids.max().item()})")
