"""The quantized linears as public ops (re-exported by pixtral_fast.ops): inputs validated once,
with a ValueError naming the argument, then a torch.library custom op (`pixtral_fast::*`, with a
fake impl for torch.compile and CUDA-graph capture) that launches the Triton kernel. Their
reference twins (pixtral_fast.reference, from pixtral_fast.quant.reference) share the signatures.

Like every op of pixtral_fast.ops, they run on a CUDA device, or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1), and never fall back silently to slow code.
"""
from __future__ import annotations

import torch

from pixtral_fast import kernels
from pixtral_fast._validation import FLOAT_DTYPES
from pixtral_fast._validation import check_tensor as _tensor
from pixtral_fast._validation import on_device as _on_device
from pixtral_fast.kernels import fp8_linear as _fp8
from pixtral_fast.kernels import w4a16_linear as _w4
from pixtral_fast.quant.formats import FP8_DTYPE, K128_BLOCK, k128_layout_ok, packed_words

def _same_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_x(x) -> None:
    _tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must be [..., in_features], got a scalar")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and kernels.INTERPRETING):
        raise ValueError(f"x is on {x.device}: pixtral_fast kernels need a CUDA device, or "
                         "TRITON_INTERPRET=1 on the CPU; pixtral_fast.reference has the same ops in plain PyTorch")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError("x must be contiguous in its last dimension")


def _rows_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


# ---------------------------------------------------------------------------------------------
# W4A16


@torch.library.custom_op("pixtral_fast::w4a16_linear", mutates_args=())
def _w4a16_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    with _on_device(x):
        return _w4.w4a16_linear(x, packed, scales, group_size)


@_w4a16_op.register_fake
def _(x, packed, scales, group_size):
    return x.new_empty(x.shape[:-1] + (packed.shape[0],))


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] @ dequant(packed, scales).T -> [..., N] in x.dtype, for compressed-tensors
    `pack-quantized` 4-bit symmetric weights: packed int32 [N, ceil(K/8)], scales [N, K/group_size]
    (float), group_size a divisor of K (K itself for per-channel scales)."""
    _check_x(x)
    k = x.shape[-1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size {group_size} must divide x's in_features {k}")
    _tensor("packed", packed, ndim=2, dtypes=(torch.int32,))
    _same_device("packed", packed, x)
    _rows_contiguous("packed", packed)
    if packed.shape[1] != packed_words(k):
        raise ValueError(f"packed {tuple(packed.shape)} must be [out_features, {packed_words(k)}] "
                         f"(8 values per int32) for in_features {k}")
    _tensor("scales", scales, ndim=2, dtypes=FLOAT_DTYPES)
    _same_device("scales", scales, x)
    if tuple(scales.shape) != (packed.shape[0], k // group_size):
        raise ValueError(f"scales {tuple(scales.shape)} must be [{packed.shape[0]}, {k // group_size}] "
                         f"(one per output row and group of {group_size})")
    return _w4a16_op(x, packed, scales, group_size)


@torch.library.custom_op("pixtral_fast::w4a16_linear_k128", mutates_args=())
def _w4a16_k128_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    with _on_device(x):
        return _w4.w4a16_k128_linear(x, packed, scales, group_size)


@_w4a16_k128_op.register_fake
def _(x, packed, scales, group_size):
    return x.new_empty(x.shape[:-1] + (packed.shape[0],))


def w4a16_linear_k128(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """w4a16_linear with the weights in the kernel's own layout (pixtral_fast.quant.formats
    .repack_w4a16_k128, what QuantLinear holds once loaded): packed int32 [out_features, Kp/8]
    (Kp: in_features rounded up to 128), scales [in_features/group_size, out_features] (float);
    group_size a power of two >= 32 dividing in_features, or in_features itself."""
    _check_x(x)
    k = x.shape[-1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if k % group_size or not k128_layout_ok(group_size, k):
        raise ValueError(f"group_size {group_size} must divide x's in_features {k} and be a power of two >= 32 "
                         "(or in_features itself)")
    words = -(-k // K128_BLOCK) * K128_BLOCK // 8
    _tensor("packed", packed, ndim=2, dtypes=(torch.int32,))
    _same_device("packed", packed, x)
    if not packed.is_contiguous() or packed.shape[1] != words:
        raise ValueError(f"packed {tuple(packed.shape)} must be contiguous [out_features, {words}] (the k128 layout "
                         f"of in_features {k})")
    _tensor("scales", scales, ndim=2, dtypes=FLOAT_DTYPES)
    _same_device("scales", scales, x)
    if tuple(scales.shape) != (k // group_size, packed.shape[0]) or not scales.is_contiguous():
        raise ValueError(f"scales {tuple(scales.shape)} must be contiguous [{k // group_size}, {packed.shape[0]}] "
                         f"(one row per group of {group_size})")
    return _w4a16_k128_op(x, packed, scales, group_size)


# ---------------------------------------------------------------------------------------------
# FP8 (weight-only)


@torch.library.custom_op("pixtral_fast::fp8_linear", mutates_args=())
def _fp8_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    with _on_device(x):
        return _fp8.fp8_linear(x, weight, scales.contiguous())


@_fp8_op.register_fake
def _(x, weight, scales):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (weight * scales).T -> [..., N] in x.dtype: weight float8_e4m3fn [N, K]
    (compressed-tensors `float-quantized`), scales per output channel ([N, 1] or [N]) or per
    tensor ([1] or []), float. Activations are not quantized."""
    _check_x(x)
    k = x.shape[-1]
    _tensor("weight", weight, ndim=2, dtypes=(FP8_DTYPE,))
    _same_device("weight", weight, x)
    _rows_contiguous("weight", weight)
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} must be [out_features, {k}] (x's in_features)")
    _tensor("scales", scales, dtypes=FLOAT_DTYPES)
    _same_device("scales", scales, x)
    n = weight.shape[0]
    if tuple(scales.shape) not in ((n, 1), (n,), (1,), ()):
        raise ValueError(f"scales {tuple(scales.shape)} must be [{n}, 1] or [{n}] (per channel), "
                         "or [1] or [] (per tensor)")
    return _fp8_op(x, weight, scales)
