"""silu(gate) * up (kernels/silu_mul.py), the quantized FFN's activation, through pixtral_fast.ops:
against a closed form on fp64 copies and against the reference in the same dtype."""
import pytest
import torch

from pixtral_fast import ops, reference
from tests.conftest import DTYPES
from tests.tolerances import assert_close


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (3, 1000), (2, 5, 7), (0, 16), (4, 5000)])
def test_matches_closed_form(shape, dtype, device):
    torch.manual_seed(0)
    gate = (torch.randn(shape) * 4).to(device=device, dtype=dtype)
    up = torch.randn(shape).to(device=device, dtype=dtype)
    out = ops.silu_mul(gate, up)
    g = gate.double()
    assert out.shape == gate.shape and out.dtype == dtype
    assert_close(out, g * torch.sigmoid(g) * up.double(), dtype)
    assert_close(out, reference.silu_mul(gate, up), dtype)


def test_strided_inputs(device):
    both = torch.randn(4, 2, 96, device=device)
    assert_close(ops.silu_mul(both[:, 0], both[:, 1]), reference.silu_mul(both[:, 0].double(), both[:, 1].double()),
                 torch.float32)


@pytest.mark.parametrize("up, message", [(torch.randn(3, 8), r"up \(3, 8\) must have gate's shape"),
                                         (torch.randn(2, 8).half(), "up has dtype")])
def test_bad_arguments_are_named(up, message, device):
    with pytest.raises(ValueError, match=message):
        ops.silu_mul(torch.randn(2, 8, device=device), up.to(device))


def test_opcheck(device):
    torch.library.opcheck(torch.ops.pixtral_fast.silu_mul, (torch.randn(3, 64, device=device),
                                                           torch.randn(3, 64, device=device)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 128), (3, 1000), (32, 7)])
def test_the_halves_of_a_fused_gate_up_output_are_read_in_place(rows, width, dtype, device):
    """gate and up as the two halves of one [rows, 2 x width] output: no copy, the same values."""
    torch.manual_seed(1)
    gate_up = (torch.randn(rows, 2 * width) * 3).to(device=device, dtype=dtype)
    gate, up = gate_up.split([width, width], dim=-1)
    assert not gate.is_contiguous() or rows == 1
    out = ops.silu_mul(gate, up)
    g = gate.double()
    assert out.is_contiguous() and out.shape == (rows, width)
    assert_close(out, g * torch.sigmoid(g) * up.double(), dtype)
    assert_close(out, reference.silu_mul(gate, up), dtype)
