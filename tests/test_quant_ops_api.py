"""pixtral_fast.ops.w4a16_linear / fp8_linear: the public ops equal their reference twins, refuse bad
arguments naming them, and trace with fake tensors (torch.compile, CUDA-graph capture)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pixtral_fast import ops, reference
from pixtral_fast.quant import formats
from pixtral_fast.quant import ops as ops_quant
from tests.conftest import DEVICE
from tests.tolerances import assert_close

N, K, GROUP = 40, 128, 32


def _w4(dtype=torch.bfloat16):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) / K**0.5
    packed, scales = formats.quantize_w4a16(w, GROUP, dtype)
    return packed.to(DEVICE), scales.to(DEVICE)


def _fp8(dtype=torch.bfloat16, per_channel=True):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) / K**0.5
    weight, scales = formats.quantize_fp8(w, per_channel, dtype)
    return weight.to(DEVICE), scales.to(DEVICE)


def _x(shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)


def test_ops_equal_their_reference_twins():
    x = _x((2, 3, K))
    packed, scales = _w4()
    out = ops.w4a16_linear(x, packed, scales, GROUP)
    assert out.shape == (2, 3, N) and out.dtype == torch.bfloat16
    assert_close(out, reference.w4a16_linear(x.double(), packed, scales, GROUP), torch.bfloat16)
    weight, fscales = _fp8(per_channel=False)
    out = ops.fp8_linear(x, weight, fscales)
    assert out.shape == (2, 3, N)
    assert_close(out, reference.fp8_linear(x.double(), weight, fscales), torch.bfloat16)


def test_fake_impls_give_the_output_shape():
    packed, scales = _w4()
    weight, fscales = _fp8()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(_x((5, K)))
        out = torch.ops.pixtral_fast.w4a16_linear(x, mode.from_tensor(packed), mode.from_tensor(scales), GROUP)
        assert out.shape == (5, N) and out.dtype == torch.bfloat16
        out = torch.ops.pixtral_fast.fp8_linear(x, mode.from_tensor(weight), mode.from_tensor(fscales))
        assert out.shape == (5, N) and out.dtype == torch.bfloat16


def test_opcheck():
    packed, scales = _w4(torch.float32)
    x = _x((3, K), torch.float32)
    torch.library.opcheck(torch.ops.pixtral_fast.w4a16_linear.default, (x, packed, scales, GROUP),
                          test_utils=("test_schema", "test_faketensor"))
    weight, fscales = _fp8(torch.float32)
    # Not test_schema here: it multiplies every input, which torch does not implement for e4m3 on the CPU.
    torch.library.opcheck(torch.ops.pixtral_fast.fp8_linear.default, (x, weight, fscales),
                          test_utils=("test_faketensor",))


def _w4_call(**change):
    packed, scales = _w4()
    args = {"x": _x((3, K)), "packed": packed, "scales": scales, "group_size": GROUP, **change}
    return ops.w4a16_linear(args["x"], args["packed"], args["scales"], args["group_size"])


@pytest.mark.parametrize("change,message", [
    ({"x": "not a tensor"}, r"^x must be a torch\.Tensor"),
    ({"x": torch.zeros(3, K, dtype=torch.int32)}, r"^x must have dtype"),
    ({"x": torch.zeros(K, 3).t()}, r"^x must be contiguous in its last dimension"),
    ({"group_size": 0}, r"^group_size must be a positive int"),
    ({"group_size": 48}, r"^group_size 48 must divide x's in_features 128"),
    ({"group_size": True}, r"^group_size must be a positive int"),
    ({"packed": torch.zeros(N, K // 8, dtype=torch.int64)}, r"^packed must have dtype"),
    ({"packed": torch.zeros(N, K // 4, dtype=torch.int32)}, r"^packed \(40, 32\) must be \[out_features, 16\]"),
    ({"packed": torch.zeros(K // 8, N, dtype=torch.int32).t()}, r"^packed must be contiguous in its last"),
    ({"scales": torch.zeros(N, 2)}, r"^scales \(40, 2\) must be \[40, 4\]"),
    ({"scales": torch.zeros(N, 4, dtype=torch.int32)}, r"^scales must have dtype"),
    ({"scales": torch.zeros(N * 4)}, r"^scales must have 2 dimensions"),
])
def test_w4a16_refuses_naming_the_argument(change, message):
    change = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and k != "x" else v for k, v in change.items()}
    with pytest.raises(ValueError, match=message):
        _w4_call(**change)


def _fp8_call(**change):
    weight, scales = _fp8()
    args = {"x": _x((3, K)), "weight": weight, "scales": scales, **change}
    return ops.fp8_linear(args["x"], args["weight"], args["scales"])


@pytest.mark.parametrize("change,message", [
    ({"x": torch.zeros(3, K, dtype=torch.float64)}, r"^x must have dtype"),
    ({"weight": torch.zeros(N, K, dtype=torch.bfloat16)}, r"^weight must have dtype"),
    ({"weight": torch.zeros(N, K + 1, dtype=torch.float8_e4m3fn)},
     r"^weight \(40, 129\) must be \[out_features, 128\]"),
    ({"weight": torch.zeros(N, K, 1, dtype=torch.float8_e4m3fn)}, r"^weight must have 2 dimensions"),
    ({"scales": torch.zeros(N, 2)}, r"^scales \(40, 2\) must be \[40, 1\] or \[40\]"),
    ({"scales": torch.zeros(N, 1, dtype=torch.float8_e4m3fn)}, r"^scales must have dtype"),
])
def test_fp8_refuses_naming_the_argument(change, message):
    with pytest.raises(ValueError, match=message):
        _fp8_call(**{k: v.to(DEVICE) for k, v in change.items()})


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the refusal of CPU tensors; here the test tensors are on the GPU")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    from pixtral_fast import kernels

    monkeypatch.setattr(kernels, "INTERPRETING", False)
    with pytest.raises(ValueError, match=r"^x is on cpu: pixtral_fast kernels need a CUDA device"):
        _w4_call()


def test_w4a16_k128_op_equals_the_reference_and_traces():
    """The fast layout's op (what QuantLinear runs once it repacked): same result as the reference
    on the checkpoint's layout, its arguments validated, a fake impl for torch.compile / graphs."""
    x = _x((2, 3, K))
    packed, scales = _w4()
    words, scales_t = formats.repack_w4a16_k128(packed, scales, GROUP, K)
    out = ops_quant.w4a16_linear_k128(x, words, scales_t, GROUP)
    assert out.shape == (2, 3, N) and out.dtype == torch.bfloat16
    assert_close(out, reference.w4a16_linear(x.double(), packed, scales, GROUP), torch.bfloat16)
    with pytest.raises(ValueError, match="power of two"):
        ops_quant.w4a16_linear_k128(x, words, scales_t, 16)
    with pytest.raises(ValueError, match="packed"):  # (for K a multiple of 128 both layouts have one shape)
        ops_quant.w4a16_linear_k128(x, words[:, :-1], scales_t, GROUP)
    with pytest.raises(ValueError, match="scales"):
        ops_quant.w4a16_linear_k128(x, words, scales, GROUP)
    with FakeTensorMode() as mode:
        fake = torch.ops.pixtral_fast.w4a16_linear_k128(mode.from_tensor(_x((5, K))), mode.from_tensor(words),
                                                        mode.from_tensor(scales_t), GROUP)
        assert fake.shape == (5, N)
    torch.library.opcheck(torch.ops.pixtral_fast.w4a16_linear_k128.default,
                          (_x((3, K), torch.float32), *formats.repack_w4a16_k128(*_w4(torch.float32), GROUP, K), GROUP),
                          test_utils=("test_schema", "test_faketensor"))
