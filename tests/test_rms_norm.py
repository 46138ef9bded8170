"""RMSNorm and the residual add before it (kernels/rms_norm.py) through pixtral_fast.ops, against
a closed form on fp64 copies of the same inputs, and against the reference in the same dtype (the
roundings happen in the same order); on the CPU under Triton's interpreter."""
import pytest
import torch

from pixtral_fast import ops, reference
from tests.conftest import DTYPES
from tests.tolerances import assert_close


def closed_form(x: torch.Tensor, w: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The normalized row rounded to `dtype`, then times the weight, in fp64."""
    xd = x.double()
    normed = (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(dtype).double()
    return normed * w.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 80), (2, 5, 128), (4, 5120), (0, 32), (2, 1)])
def test_rms_norm_matches_closed_form(shape, dtype, device):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(device=device, dtype=dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(device=device, dtype=dtype)
    y = ops.rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, closed_form(x, w, 1e-5, dtype), dtype)
    assert_close(y, reference.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 80), (7, 5120)])
def test_add_rms_norm_writes_the_sum_and_its_norm(shape, dtype, device):
    torch.manual_seed(1)
    x = torch.randn(shape).to(device=device, dtype=dtype)
    r = (torch.randn(shape) * 4).to(device=device, dtype=dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(device=device, dtype=dtype)
    y, h = ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(h, (x.double() + r.double()).to(dtype))  # one rounding of the exact sum
    assert_close(y, closed_form(h, w, 1e-6, dtype), dtype)


def test_large_rows_do_not_overflow_in_low_precision(device):
    """Squares of fp16 values near 6e4 overflow fp16: the sum is fp32 inside the kernel."""
    x = torch.full((2, 256), 6.0e4, dtype=torch.float16, device=device)
    y = ops.rms_norm(x, torch.ones(256, dtype=torch.float16, device=device), 1e-5)
    assert torch.isfinite(y).all() and torch.allclose(y.float(), torch.ones_like(y, dtype=torch.float32))


def test_strided_rows_are_read_as_they_are(device):
    x = torch.randn(4, 2, 96, device=device)[:, 1]  # rows 192 apart
    w = torch.rand(96, device=device)
    assert_close(ops.rms_norm(x, w, 1e-5), closed_form(x, w, 1e-5, torch.float32), torch.float32)


@pytest.mark.parametrize("call, message", [
    (lambda x, w: ops.rms_norm(x.long(), w, 1e-5), "x must have dtype"),
    (lambda x, w: ops.rms_norm(x, w[:-1], 1e-5), "weight must be a contiguous [64]"),
    (lambda x, w: ops.rms_norm(x, w.half(), 1e-5), "weight has dtype"),
    (lambda x, w: ops.rms_norm(x, w, 0.0), "eps must be a finite real number > 0"),
    (lambda x, w: ops.rms_norm(x, w, float("nan")), "eps must be"),
    (lambda x, w: ops.add_rms_norm(x, x[:1], w, 1e-5), "residual (1, 64) must have x's shape (3, 64)"),
    (lambda x, w: ops.add_rms_norm(x, x.half(), w, 1e-5), "residual has dtype"),
    (lambda x, w: ops.rms_norm(torch.zeros(2, 0), w, 1e-5), "dim >= 1"),
])
def test_bad_arguments_are_named(call, message, device):
    x, w = torch.randn(3, 64, device=device), torch.rand(64, device=device)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(x, w)


def test_opcheck(device):
    x, w = torch.randn(3, 64, device=device), torch.rand(64, device=device)
    torch.library.opcheck(torch.ops.pixtral_fast.rms_norm, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.pixtral_fast.add_rms_norm, (x, x.clone(), w, 1e-5))
