"""The decode step's row-wise ops and its dense linear dispatch, each validated once here (ValueError
naming the argument) and launched through a torch.library custom op with a fake impl: RMSNorm and
the residual add before it (kernels/rms_norm.py), silu(gate) * up (kernels/silu_mul.py), and our
split-K GEMV (kernels/gemv.py) with `linear`, which sends the weight shapes chosen to it and the
rest to cuBLAS. pixtral_fast.ops makes them public; their reference twins are in
pixtral_fast.reference."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pixtral_fast._validation import FLOAT_DTYPES, kernels_can_run
from pixtral_fast._validation import check_tensor as _tensor
from pixtral_fast._validation import on_device as _on_device
from pixtral_fast._validation import positive_real as _positive_real
from pixtral_fast._validation import runnable as _runnable
from pixtral_fast._validation import same_place as _same
from pixtral_fast.kernels import gemv as _gemv
from pixtral_fast.kernels import rms_norm as _norm
from pixtral_fast.kernels import silu_mul as _silu_mul


# ---------------------------------------------------------------------------------------------
# RMSNorm (and the residual add before it)


@torch.library.custom_op("pixtral_fast::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    with _on_device(x):
        return _norm.rms_norm(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("pixtral_fast::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(x):
        return _norm.rms_norm(x, weight, eps, residual)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _check_norm(x, weight, eps, residual=None) -> tuple[torch.Tensor, float]:
    """x as [rows, dim] (last dim contiguous), and eps; ValueError naming the bad argument."""
    _tensor("x", x, dtypes=FLOAT_DTYPES)
    _runnable("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., dim] with dim >= 1, got shape {tuple(x.shape)}")
    if x.shape[-1] > _norm.MAX_COLS:
        raise ValueError(f"x's last dimension {x.shape[-1]} exceeds the {_norm.MAX_COLS} the kernel holds")
    _tensor("weight", weight, ndim=1)
    _same("weight", weight, "x", x)
    if weight.shape[0] != x.shape[-1] or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{x.shape[-1]}], got shape {tuple(weight.shape)}")
    if residual is not None:
        _tensor("residual", residual)
        _same("residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]), _positive_real("eps", eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps), rounded to x.dtype, times weight; x [..., dim], weight [dim]."""
    rows, eps = _check_norm(x, weight, eps)
    return _rms_norm_op(_row_major(rows), weight, eps).view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(h, weight, eps), h) with h = x + residual rounded to x.dtype, in one launch."""
    rows, eps = _check_norm(x, weight, eps, residual)
    y, h = _add_rms_norm_op(_row_major(rows), _row_major(residual.reshape(rows.shape)), weight, eps)
    return y.view(x.shape), h.view(x.shape)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# The quantized FFN's activation


@torch.library.custom_op("pixtral_fast::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    with _on_device(gate):
        return _silu_mul.silu_mul(gate, up)


@_silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)  # contiguous, whatever gate's row stride


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded once to the inputs' dtype, in one launch. Views whose rows
    are contiguous (the two halves of a fused gate/up output) are read in place, without a copy."""
    _tensor("gate", gate, dtypes=FLOAT_DTYPES)
    _runnable("gate", gate)
    _tensor("up", up)
    _same("up", up, "gate", gate)
    if up.shape != gate.shape:
        raise ValueError(f"up {tuple(up.shape)} must have gate's shape {tuple(gate.shape)}")
    width = gate.shape[-1] if gate.dim() else 1
    out = _silu_mul_op(_rows(gate, width), _rows(up, width))
    return out.view(gate.shape)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [rows, width] with contiguous rows: a view where its strides allow, else a copy."""
    rows = t.reshape(-1, width) if t.dim() else t.reshape(1, 1)
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


# ---------------------------------------------------------------------------------------------
# Dense linears at decode batch sizes: cuBLAS, or our split-K GEMV for the shapes chosen


@torch.library.custom_op("pixtral_fast::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, split_k: int) -> torch.Tensor:
    with _on_device(x):
        return _gemv.gemv(x, w, split_k or None)


@_gemv_op.register_fake
def _(x, w, split_k):
    return x.new_empty((x.shape[0], w.shape[0]))


def gemv(x: torch.Tensor, w: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
    """x @ w.T for a few rows x [M, K] and a weight w [N, K] (kernels/gemv.py: split-K, weight
    streamed with 16-byte loads, deterministic reduction); split_k None: chosen per shape."""
    _gemv._check(x, w, split_k)
    return _gemv_op(x, w, split_k or 0)


GEMV_MAX_ROWS = 32  # the batches the GEMV is built for; larger ones are GEMMs
_gemv_for: set[tuple[int, int]] | str = set()


def use_gemv(shapes) -> None:
    """Which dense linears `linear` sends to the GEMV at up to GEMV_MAX_ROWS rows: "all", None
    (cuBLAS everywhere, the default until a device run has compared them), or weight shapes
    (N, K). $PIXTRAL_FAST_GEMV sets it at import: "all", or "6144x5120,131072x5120"."""
    global _gemv_for
    if shapes == "all":
        _gemv_for = "all"
    elif shapes is None:
        _gemv_for = set()
    else:
        shapes = {tuple(int(d) for d in shape) for shape in shapes}
        if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
            raise ValueError(f"use_gemv takes 'all', None or weight shapes (N, K), got {sorted(shapes)}")
        _gemv_for = shapes


def _gemv_from_environment() -> None:
    value = os.environ.get("PIXTRAL_FAST_GEMV", "").strip()
    try:
        use_gemv("all" if value == "all" else [tuple(p.split("x")) for p in value.split(",") if p.strip()])
    except ValueError as e:
        raise ValueError(f"PIXTRAL_FAST_GEMV={value!r}: 'all' or shapes like 6144x5120,131072x5120 ({e})") from None


_gemv_from_environment()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (no bias): the GEMV where use_gemv chose this weight's shape and x has few rows,
    cuBLAS (torch) otherwise."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    chosen = _gemv_for == "all" or tuple(w.shape) in _gemv_for
    if chosen and rows.shape[0] <= GEMV_MAX_ROWS and x.dtype == w.dtype and kernels_can_run(x.device):
        return gemv(rows if rows.stride(-1) == 1 else rows.contiguous(), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)
