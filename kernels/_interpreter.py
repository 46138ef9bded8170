"""Makes Triton's CPU interpreter (TRITON_INTERPRET=1) compute bf16 the way the GPU does.

Installed by `pixtral_fast.kernels` on import whenever the kernels run interpreted, so every
user of `pixtral_fast.ops` on the CPU gets right bf16 results, not only the test suite.

The upstream bug (seen in Triton 3.9; to report at triton-lang/triton, "interpreter: bf16 is
computed on its uint16 storage"): the interpreter keeps bf16 tensors as raw uint16 numpy arrays
and then
  * `tl.dot` on bf16 operands multiplies those integers (a 32x32 bf16 dot is off by ~5e10);
  * elementwise arithmetic and comparisons on bf16 (`a * b`, `a + b`, `-a`, `tl.maximum`,
    `tl.exp`, fma) operate on the integers, and so do `tl.max` / `tl.min` / `tl.sum` of bf16;
  * fp32 -> bf16 casts truncate instead of rounding to nearest-even, its round-to-nearest path
    (`_convert_float` with RTNE) drops the carry into the exponent (0.4998 becomes 0.25), and
    casts between bf16 and anything but fp32 (fp64, fp16 aside, integers) reinterpret the bits.
Loads, stores, bitcasts and bf16 -> fp32 casts are right.
FP8 e4m3 (tl.float8e4nv, torch.float8_e4m3fn) is kept as its uint8 bits, and its casts go
through the same generic `_convert_float`: e4m3 -> bf16 reinterprets (through the bf16 casts
above), e4m3 -> fp32 is right but for NaN (read as 480), and anything -> e4m3 truncates the
mantissa then adds the cut-off bit (round half up, not to even; the carry into the exponent is
dropped; subnormal results and values past 448 come out wrong). A GPU computes bf16 dots with fp32
accumulation and bf16 elementwise ops in fp32 rounded back to bf16, and rounds casts to
nearest-even.

`install()` wraps the interpreter's builder and its reduction helper so that bf16 operands are
widened to fp32 exactly (a bf16 is the top half of an fp32), results that are bf16 on the GPU are
rounded back to bf16 (nearest-even), and casts from and to bf16 go through fp32. Casts from e4m3
decode its 256 codes exactly (a table; NaN stays NaN) into fp32, then cast that as any fp32;
casts to e4m3 with the default round-to-nearest-even round from the exact (fp64) value and
saturate at +-448, NaN kept, as the GPU's `cvt.rn.satfinite.e4m3x2` does. Kernel code is
unchanged: only the simulation is corrected. fp16 needs nothing: the interpreter stores it as
numpy float16, whose arithmetic rounds per operation like the GPU's, and its dots accumulate in
fp32 (checked for every kernel against an fp64 oracle in tests/test_interpreter_dtypes.py).
"""
from __future__ import annotations

import numpy as np

_installed = False


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, NaN kept quiet (what `__float2bfloat16_rn` does)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):
        rounded = np.where(nan, ((u >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)
    return rounded.reshape(np.shape(x))


def _e4m3_table() -> np.ndarray:
    """fp32 value of each of the 256 e4m3fn codes: sign, 4 exponent bits (bias 7), 3 mantissa
    bits; exponent 0 is subnormal (m / 8 * 2^-6); 0x7F / 0xFF are NaN (e4m3fn has no infinity)."""
    code = np.arange(256)
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    value = np.where(code & 0x80, -magnitude, magnitude)
    value[(code & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


E4M3_VALUES = _e4m3_table()
E4M3_MAX = 448.0
_E4M3_POSITIVE = E4M3_VALUES[:0x7F].astype(np.float64)  # codes 0x00..0x7E, increasing


def e4m3_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return E4M3_VALUES[np.asarray(bits, dtype=np.uint8)]


def float_to_e4m3_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even from the exact value (any float dtype, read as fp64), saturating at
    +-448 (satfinite), NaN -> 0x7F with the sign bit kept."""
    x = np.asarray(x, dtype=np.float64)
    magnitude = np.minimum(np.abs(x), E4M3_MAX)
    nan = np.isnan(x)
    magnitude = np.where(nan, 0.0, magnitude)
    upper = np.searchsorted(_E4M3_POSITIVE, magnitude, side="left")  # first code >= magnitude
    lower = np.maximum(upper - 1, 0)
    below, above = magnitude - _E4M3_POSITIVE[lower], _E4M3_POSITIVE[upper] - magnitude
    # Codes are consecutive integers, so "even" is the code's low bit; an exact hit has above == 0.
    take_lower = (below < above) | ((below == above) & (lower % 2 == 0) & (upper != lower))
    code = np.where(take_lower, lower, upper)
    code = np.where(nan, 0x7F, code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def installed() -> bool:
    return _installed


def install() -> None:
    """Idempotent; a no-op cost for anything but bf16 operands."""
    global _installed
    if _installed:
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    handle = interp.TensorHandle
    bf16, fp32, e4m3 = tl.bfloat16, tl.float32, tl.float8e4nv
    rtne = interp._ir.ROUNDING_MODE.RTNE
    original = {name: getattr(builder, name)
                for name in ("create_dot", "binary_op", "unary_op", "cast_impl", "create_fp_to_fp", "create_fma")}

    def is_bf16(h) -> bool:
        return h.dtype.scalar == bf16

    def widen(h):
        return handle(bf16_bits_to_fp32(h.data), fp32) if is_bf16(h) else h

    def narrow(h):
        return handle(fp32_to_bf16_bits(h.data), bf16)

    def create_dot(self, a, b, d, *args):
        out = original["create_dot"](self, widen(a), widen(b), widen(d), *args)
        return narrow(out) if is_bf16(d) else out

    def binary_op(self, lhs, rhs, op):
        wide = is_bf16(lhs) or is_bf16(rhs)
        out = original["binary_op"](self, widen(lhs), widen(rhs), op)
        return narrow(out) if wide and out.dtype.scalar == fp32 else out  # comparisons stay bool

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return original["unary_op"](self, arg, op)
        return narrow(original["unary_op"](self, widen(arg), op))

    def create_fma(self, x, y, z):
        if not (is_bf16(x) or is_bf16(y) or is_bf16(z)):
            return original["create_fma"](self, x, y, z)
        return narrow(original["create_fma"](self, widen(x), widen(y), widen(z)))

    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if is_bf16(src):
            wide = widen(src)
            return wide if dst == fp32 else original["cast_impl"](self, wide, dst_type)
        if dst == bf16:
            wide = src if src.dtype.scalar == fp32 else original["cast_impl"](self, src, fp32)
            return narrow(wide)
        return original["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        if src.dtype.scalar == e4m3 and not dst.is_fp8():  # exact decode, then an fp32 cast
            wide = handle(e4m3_bits_to_fp32(src.data), fp32)
            return wide if dst == fp32 else cast_impl(self, wide, dst_type)
        if dst == e4m3 and not src.dtype.scalar.is_fp8() and rounding_mode == rtne:
            return handle(float_to_e4m3_bits(widen(src).data), e4m3)
        if src.dtype.scalar.is_fp8() and dst == bf16:  # other fp8 formats: their fp32 path, rounded once
            return narrow(original["create_fp_to_fp"](self, src, fp32, rounding_mode))
        if is_bf16(src) and dst.is_fp8():
            return original["create_fp_to_fp"](self, widen(src), dst_type, rounding_mode)
        if is_bf16(src) or dst == bf16:  # every rounding mode asked of us is RTNE here
            return cast_impl(self, src, dst_type)
        return original["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    builder.create_dot = create_dot
    builder.binary_op = binary_op
    builder.unary_op = unary_op
    builder.create_fma = create_fma
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    # The lambdas (create_fp_ext, create_fp_trunc, create_si_to_fp, ...) call self.cast_impl and
    # the named ops (create_fadd, create_exp, ...) call self.binary_op / self.unary_op: they see
    # the wrapped versions.

    reduce_ops = interp.ReduceOps
    original_min_max, original_sum = reduce_ops.min_max, reduce_ops.sum

    def retyped(self, x, data, dtype):
        # to_tensor makes a block of any array with a shape: a scalar's data goes in 0-d.
        return self.to_tensor(data if x.type.is_block() else data.reshape(()), dtype)

    def wide_tensor(self, x):
        return retyped(self, x, bf16_bits_to_fp32(x.handle.data), fp32)

    def narrow_tensor(self, x):
        return retyped(self, x, fp32_to_bf16_bits(x.handle.data), bf16)

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        value = input[0] if isinstance(input, tuple) else input
        if value.dtype.scalar != bf16:
            return original_min_max(self, input, val_reduce_op, idx_reduce_op)
        out = original_min_max(self, wide_tensor(self, value), val_reduce_op, idx_reduce_op)
        if val_reduce_op is None:
            return out
        if idx_reduce_op is None:
            return narrow_tensor(self, out)
        return narrow_tensor(self, out[0]), out[1]

    def reduce_sum(self, input):
        if input.dtype.scalar != bf16:
            return original_sum(self, input)
        return narrow_tensor(self, original_sum(self, wide_tensor(self, input)))

    reduce_ops.min_max = min_max
    reduce_ops.sum = reduce_sum
    _installed = True
