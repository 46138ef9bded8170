"""Gated FFN (kernels/gated_ffn.py) through pixtral_fast.ops, against pixtral_fast.reference on
fp64 copies of the same inputs; on the CPU the fused kernel runs under Triton's interpreter."""
import pytest
import torch

from pixtral_fast import ops, reference
from pixtral_fast.kernels import gated_ffn as ffn_kernels
from tests.conftest import DTYPES
from tests.tolerances import assert_close

ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]


def make_ffn(m, dim, hidden, out, dtype, device, seed=0):
    """x [m, dim] ~ N(0, 1) and weights scaled by 1/sqrt(fan_in), so every stage is O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, dim, generator=g)
    w_gate = torch.randn(hidden, dim, generator=g) / dim ** 0.5
    w_up = torch.randn(hidden, dim, generator=g) / dim ** 0.5
    w_down = torch.randn(out, hidden, generator=g) / hidden ** 0.5
    return [t.to(device=device, dtype=dtype) for t in (x, w_gate, w_up, w_down)]


def check_ffn(x, w_gate, w_up, w_down, activation, dtype):
    out = ops.gated_ffn(x, w_gate, w_up, w_down, activation)
    ref = reference.gated_ffn(x.double(), w_gate.double(), w_up.double(), w_down.double(), activation)
    assert out.dtype == dtype and out.shape == x.shape[:-1] + (w_down.shape[0],)
    assert_close(out, ref, dtype)


# (M, K=dim, N=hidden, out): M = 1 (decode), ragged M / N / K against the interpreter's 32-tiles
SHAPES = [(1, 64, 96, 32), (37, 72, 100, 48), (130, 40, 33, 24)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,dim,hidden,out", SHAPES)
def test_gated_ffn_matches_reference(m, dim, hidden, out, dtype, activation, device):
    check_ffn(*make_ffn(m, dim, hidden, out, dtype, device), activation, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_activation_kernel_alone(dtype, activation, device):
    """The fused kernel's own output, act(x Wg^T) * (x Wu^T), before the down projection."""
    x, w_gate, w_up, _ = make_ffn(37, 72, 100, 1, dtype, device, seed=1)
    hidden = ffn_kernels.gated_activation(x, w_gate, w_up, activation)
    xd = x.double()
    ref = reference.apply_activation(xd @ w_gate.double().T, activation) * (xd @ w_up.double().T)
    assert hidden.dtype == dtype and hidden.shape == (37, 100)
    assert_close(hidden, ref, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter
def test_activation_tails(device):
    """Large |pre-activation| (the exp in the sigmoid forms overflows): no NaN, exact limits."""
    dim = 16
    x = torch.zeros(3, dim, device=device)
    x[0, 0], x[1, 0], x[2, 0] = 100.0, -100.0, 0.5
    w_gate = torch.zeros(8, dim, device=device)
    w_gate[:, 0] = torch.tensor([1.0, -1.0, 3.0, -3.0, 0.0, 0.1, -0.7, 1.0], device=device)
    w_up = torch.ones(8, dim, device=device)
    for activation in ACTIVATIONS:
        hidden = ffn_kernels.gated_activation(x, w_gate, w_up, activation)
        xd = x.double()
        ref = reference.apply_activation(xd @ w_gate.double().T, activation) * (xd @ w_up.double().T)
        assert torch.isfinite(hidden).all(), activation
        assert_close(hidden, ref, torch.float32, msg=activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_ffn_leading_dims_and_row_stride(dtype, device):
    """x [..., dim] with leading dims (flattened by a view) and a row stride wider than dim."""
    x, w_gate, w_up, w_down = make_ffn(2 * 9, 48, 40, 24, dtype, device, seed=2)
    check_ffn(x.view(2, 9, 48), w_gate, w_up, w_down, "silu", dtype)
    wide = torch.randn(18, 64, device=device).to(dtype)
    x_strided = wide[:, 5:53]  # row stride 64, dim 48
    assert x_strided.stride() == (64, 1)
    check_ffn(x_strided, w_gate, w_up, w_down, "gelu", dtype)


def test_gated_ffn_refuses_hidden_copy(device):
    """Leading dims that cannot flatten without a copy: a clear ValueError, never a silent copy."""
    x, w_gate, w_up, w_down = make_ffn(1, 48, 40, 24, torch.float32, device)
    base = torch.randn(4, 6, 48, device=device)
    x_bad = base[:, :3]  # [4, 3, 48] with strides (288, 48, 1): no [12, 48] view exists
    with pytest.raises(ValueError, match="flatten"):
        ops.gated_ffn(x_bad, w_gate, w_up, w_down)


def test_gated_ffn_empty_batch(device):
    x, w_gate, w_up, w_down = make_ffn(0, 48, 40, 24, torch.float32, device)
    assert ops.gated_ffn(x, w_gate, w_up, w_down).shape == (0, 24)


def test_gated_ffn_opcheck(device):
    x, w_gate, w_up, w_down = make_ffn(5, 32, 48, 16, torch.float32, device, seed=3)
    torch.library.opcheck(torch.ops.pixtral_fast.gated_ffn.default, (x, w_gate, w_up, w_down, "silu"))


def shipped_configs():
    for cap in (90, 80):
        for dtype in DTYPES:
            for c in ffn_kernels.configs(cap, dtype):
                yield pytest.param(dtype, c, id=f"sm{cap}-{str(dtype)[6:]}-{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}")


@pytest.mark.parametrize("dtype,config", list(shipped_configs()))
def test_every_shipped_config_is_correct(dtype, config, device):
    """Each autotune candidate (tile shapes the interpreter's default never runs: BLOCK_K larger
    than K, 16-row tiles, 128-wide tiles) on a ragged shape."""
    x, w_gate, w_up, _ = make_ffn(37, 72, 100, 1, dtype, device, seed=6)
    hidden = ffn_kernels.gated_activation(x, w_gate, w_up, "gelu_tanh", config=config)
    xd = x.double()
    ref = reference.apply_activation(xd @ w_gate.double().T, "gelu_tanh") * (xd @ w_up.double().T)
    assert_close(hidden, ref, dtype)


def test_configs_fit_their_arch():
    """Autotune candidates stay within each arch's shared memory (the AOT compile test checks the
    compiled kernels; this catches an edit that forgets the stage arithmetic)."""
    limits = {90: 232448, 80: 166912}
    for cap, limit in limits.items():
        for dtype in DTYPES:
            for c in ffn_kernels.configs(cap, dtype):
                stage = (c["BLOCK_M"] + 2 * c["BLOCK_N"]) * c["BLOCK_K"] * dtype.itemsize
                assert stage * c["num_stages"] <= limit, (cap, dtype, c)


# ---------------------------------------------------------------------------------------------
# real model shapes (GPU only)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [4096, 37, 1])
def test_gated_ffn_vit_shape_gpu(m, device):
    """The ViT FFN, 1024 -> 4096 -> 1024, SiLU, bf16: one 1024x1024 image (4096 patches) and
    ragged / decode-sized token counts."""
    check_ffn(*make_ffn(m, 1024, 4096, 1024, torch.bfloat16, device, seed=4), "silu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_ffn_fp32_gpu(activation, device):
    """fp32 stays IEEE on the GPU (no TF32): tight fp32 tolerance over K = 1024."""
    check_ffn(*make_ffn(300, 1024, 512, 256, torch.float32, device, seed=5), activation, torch.float32)
