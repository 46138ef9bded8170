"""Makes Triton's CPU interpreter compute bf16 the way the GPU does. Test support only.

Triton's interpreter (seen in 3.9) keeps bf16 tensors as raw uint16 numpy arrays, then:
  * `tl.dot` on bf16 operands multiplies those integers (a 32x32 bf16 dot is off by ~5e10);
  * arithmetic on two bf16 operands (`a * b`, `a + b`) adds or multiplies the integers too;
  * fp32 -> bf16 casts truncate instead of rounding to nearest-even, and its round-to-nearest
    path (`_convert_float` with RTNE) drops the carry into the exponent (0.4998 becomes 0.25).
Loads, stores and bf16 -> fp32 casts are right. The GPU computes bf16 dots with fp32
accumulation, bf16 elementwise ops in fp32 rounded back to bf16, and rounds casts to nearest-even.

This module wraps the interpreter's builder so that bf16 operands of dots and binary ops are
widened to fp32 exactly (bf16 is the top half of an fp32), binary-op results are rounded back to
bf16, and fp32 -> bf16 casts round to nearest-even. Kernel code is unchanged: only the simulation
is corrected. Comparisons, reductions and math functions on bf16 stay wrong in the interpreter,
so kernels widen bf16 to fp32 before them (which they do anyway, for accuracy). To report upstream (triton-lang/triton, interpreter): "bf16 tl.dot / binary ops
operate on the uint16 storage; fp32->bf16 casts truncate; RTNE conversion loses the mantissa carry".

`install()` is called by tests/conftest.py only when TRITON_INTERPRET=1.
"""
from __future__ import annotations

import numpy as np

_installed = False


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, NaN kept quiet (what `__float2bfloat16_rn` does)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):
        rounded = np.where(nan, ((u >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)
    return rounded.reshape(np.shape(x))


def install() -> None:
    global _installed
    if _installed:
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    handle = interp.TensorHandle
    original_dot, original_binary, original_cast = builder.create_dot, builder.binary_op, builder.cast_impl

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return handle(bf16_bits_to_fp32(h.data), tl.float32), True
        return h, False

    def create_dot(self, a, b, d, *args):
        a, _ = widen(a)
        b, _ = widen(b)
        if d.dtype.scalar == tl.bfloat16:
            d, _ = widen(d)
            out = original_dot(self, a, b, d, *args)
            return handle(fp32_to_bf16_bits(out.data), tl.bfloat16)
        return original_dot(self, a, b, d, *args)

    def binary_op(self, lhs, rhs, op):
        lhs, wide_l = widen(lhs)
        rhs, wide_r = widen(rhs)
        out = original_binary(self, lhs, rhs, op)
        if (wide_l or wide_r) and out.dtype.scalar == tl.float32:
            return handle(fp32_to_bf16_bits(out.data), tl.bfloat16)
        return out

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle(fp32_to_bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.binary_op = binary_op
    builder.cast_impl = cast_impl
    _installed = True
