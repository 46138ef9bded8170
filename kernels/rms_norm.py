"""RMSNorm, Triton, one program per row, optionally after a residual add.

y = round(x * rsqrt(mean(x^2) + eps)) * weight, the roundings in the reference's order
(pixtral_fast.reference.rms_norm): the sum of squares and the scale in fp32, the normalized row
rounded to x's dtype, then the product with the weight rounded once more. With a residual,
h = x + residual (rounded to x's dtype) is written out and normalized in the same pass: the
decoder's residual add and the norm after it, one launch instead of eight ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import TRITON_DTYPE


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, n_cols, stride_x, stride_r, stride_y, stride_h, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    scale = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def _config(n_cols: int) -> dict:
    """The whole row in one program: 4 warps up to 4K columns, 8 beyond, 16 past 16K."""
    block = triton.next_power_of_2(n_cols)
    return {"BLOCK": block, "num_warps": 4 if block <= 4096 else 8 if block <= 16384 else 16}


MAX_COLS = 65536  # the widest row one program holds (config: dims up to 65,536)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [rows, dim] (last dim contiguous), weight [dim]; with `residual` (same shape as x) returns
    (y, h), else y. Inputs are validated by pixtral_fast.ops."""
    rows, n_cols = x.shape
    y = torch.empty((rows, n_cols), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    if rows:
        cfg = _config(n_cols)
        r = residual if residual is not None else x
        _rms_norm_kernel[(rows,)](x, r, weight, y, h, n_cols, x.stride(0), r.stride(0), y.stride(0), h.stride(0),
                                  float(eps), HAS_RESIDUAL=residual is not None, BLOCK=cfg["BLOCK"],
                                  num_warps=cfg["num_warps"], num_stages=1)
    return (y, h) if residual is not None else y


_ALIGNED = ("x_ptr", "r_ptr", "w_ptr", "y_ptr", "h_ptr", "n_cols", "stride_x", "stride_r", "stride_y", "stride_h")


def compile_specs(capability: int) -> list[dict]:
    """Per dtype, with and without the residual: the ViT's dim (1024), the decoder's (5120) and
    Pixtral-Large's (12288)."""
    specs = []
    for dtype, name in TRITON_DTYPE.items():
        ptr = f"*{name}"
        for n_cols in (1024, 5120, 12288):
            cfg = _config(n_cols)
            for residual in (False, True):
                specs.append({
                    "name": f"rms_norm{'_add' if residual else ''}_{name}_{n_cols}",
                    "fn": _rms_norm_kernel,
                    "signature": {"x_ptr": ptr, "r_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr, "h_ptr": ptr,
                                  "n_cols": "i32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32",
                                  "stride_h": "i32", "eps": "fp32", "HAS_RESIDUAL": "constexpr",
                                  "BLOCK": "constexpr"},
                    "constexprs": {"HAS_RESIDUAL": residual, "BLOCK": cfg["BLOCK"]},
                    "attrs": {arg: [["tt.divisibility", 16]] for arg in _ALIGNED},
                    "num_warps": cfg["num_warps"], "num_stages": 1,
                })
    return specs
