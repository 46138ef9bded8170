"""silu(gate) * up, Triton, elementwise: the quantized FFN's activation between its projections in
one launch instead of five (two casts up, silu, the product, the cast down). Computed in fp32 and
rounded once to the inputs' dtype, as the reference does. Gate and up are read with their own row
strides: the halves of one fused gate/up GEMM's output need no copy."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import TRITON_DTYPE

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, n, width, g_row_stride, u_row_stride, BLOCK: tl.constexpr):
    """Over the n = rows x width outputs; gate and up rows may lie apart (the two halves of one
    fused gate/up GEMM's output), each row contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = offs // width
    col = offs - row * width
    g = tl.load(g_ptr + row * g_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, (g * tl.sigmoid(g) * u).to(o_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [rows, width], same shape and dtype, rows contiguous (validated by
    pixtral_fast.ops); the output is contiguous."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, gate.shape[1], gate.stride(0), up.stride(0),
                                                   BLOCK=BLOCK, num_warps=4)
    return out


def compile_specs(capability: int) -> list[dict]:
    return [{"name": f"silu_mul_{name}", "fn": _silu_mul_kernel,
             "signature": {"g_ptr": f"*{name}", "u_ptr": f"*{name}", "o_ptr": f"*{name}", "n": "i32",
                           "width": "i32", "g_row_stride": "i32", "u_row_stride": "i32", "BLOCK": "constexpr"},
             "constexprs": {"BLOCK": BLOCK},
             "attrs": {arg: [["tt.divisibility", 16]] for arg in ("g_ptr", "u_ptr", "o_ptr", "n")},
             "num_warps": 4, "num_stages": 1} for name in TRITON_DTYPE.values()]
