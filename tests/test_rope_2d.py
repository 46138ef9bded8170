"""RoPE kernels (kernels/rope_2d.py) through pixtral_fast.ops, against a closed form written here
(frequencies theta^(-2i/D) in fp64, independent of pixtral_fast.reference) on fp64 copies of the
same inputs; on the CPU they run under Triton's interpreter."""
import math

import pytest
import torch

from pixtral_fast import ops, reference
from tests.conftest import DTYPES
from tests.tolerances import assert_close


def grid_positions(grids, device) -> torch.Tensor:
    """(row, col) of every patch of several images packed in order, row-major, restarting at
    (0, 0) per image: int32 [sum(h*w), 2]."""
    parts = []
    for h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([rows.flatten(), cols.flatten()], dim=-1))
    return torch.cat(parts).to(device=device, dtype=torch.int32)


def frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """f_i = theta^(-2i/D), i < D/2, in fp64 from Python floats, then rounded once to fp32 (the
    precision every implementation stores them in), kept as fp64."""
    return torch.tensor([theta ** (-(2 * i) / head_dim) for i in range(head_dim // 2)]).float().double()


def closed_form_angles(pos: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """[T, D/2] angles in fp64 with the fp32 rounding of pos * f that the op specifies (Mistral's
    fp32 angles): the fp64 product of an integer < 2^24 and an fp32 is exact, then one rounding.
    1-D pos [T]: pair i turns by pos * f_i. 2-D pos [T, 2] (DESIGN §1): pair i < D/4 turns by
    row * f_{2i}, pair i >= D/4 by col * f_{2(i - D/4) + 1}."""
    f = frequencies(head_dim, theta)
    pos = pos.cpu().double()
    if pos.dim() == 1:
        angle = pos[:, None] * f[None, :]
    else:
        angle = torch.cat([pos[:, :1] * f[0::2], pos[:, 1:] * f[1::2]], dim=-1)
    return angle.float().double()


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    x = x.double().cpu()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = angle.cos()[:, None, :], angle.sin()[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def check_rope(fast, q, k, pos, theta, dtype):
    q_out, k_out = fast(q, k, pos, theta)
    angle = closed_form_angles(pos, q.shape[-1], theta)
    for out, x in ((q_out, q), (k_out, k)):
        assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
        assert_close(out.cpu(), rotate(x, angle), dtype)


# token counts 1, 7, 37, 130 made of images of different shapes; heads 1, 3, 16; GQA k heads
GRIDS_2D = [
    ([(1, 1)], 1, 1, 64),
    ([(1, 1), (2, 3)], 3, 1, 64),
    ([(5, 7), (1, 2)], 16, 16, 64),
    ([(7, 13), (6, 6), (1, 3)], 3, 16, 64),
    ([(2, 2), (3, 11)], 4, 2, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grids,q_heads,k_heads,head_dim", GRIDS_2D)
def test_rope_2d_matches_closed_form(grids, q_heads, k_heads, head_dim, dtype, device):
    torch.manual_seed(0)
    pos = grid_positions(grids, device)
    q = torch.randn(pos.shape[0], q_heads, head_dim, device=device).to(dtype)
    k = torch.randn(pos.shape[0], k_heads, head_dim, device=device).to(dtype)
    check_rope(ops.rope_2d, q, k, pos, 10000.0, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,q_heads,k_heads,head_dim", [(1, 4, 1, 128), (37, 8, 2, 128), (7, 3, 3, 64)])
def test_rope_1d_long_positions(tokens, q_heads, k_heads, head_dim, dtype, device):
    """The decoder: theta 1e9, positions up to 131071 (angles up to 1.3e5 rad)."""
    torch.manual_seed(1)
    pos = torch.randint(0, 131072, (tokens,), dtype=torch.int32, device=device)
    pos[0] = 131071
    pos[-1] = 0 if tokens > 1 else pos[-1]
    q = torch.randn(tokens, q_heads, head_dim, device=device).to(dtype)
    k = torch.randn(tokens, k_heads, head_dim, device=device).to(dtype)
    check_rope(ops.rope_1d, q, k, pos, 1e9, dtype)


def fused_qkv_views(kind: str, tokens: int, q_heads: int, k_heads: int, head_dim: int, dtype, device):
    """q and k as the strided views a fused QKV projection gives (never copied)."""
    if kind == "packed_heads":  # [T, Hq + 2 Hk, D]: token stride (Hq + 2 Hk) * D
        qkv = torch.randn(tokens, q_heads + 2 * k_heads, head_dim, device=device).to(dtype)
        return qkv[:, :q_heads], qkv[:, q_heads:q_heads + k_heads]
    if kind == "flat_rows":  # [T, (Hq + 2 Hk) * D] split then viewed per head
        qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_dim, device=device).to(dtype)
        q = qkv[:, :q_heads * head_dim].unflatten(-1, (q_heads, head_dim))
        k = qkv[:, q_heads * head_dim:(q_heads + k_heads) * head_dim].unflatten(-1, (k_heads, head_dim))
        return q, k
    # "heads_major": [3, H, T, D] transposed: the head stride exceeds the token stride
    qkv = torch.randn(3, q_heads, tokens, head_dim, device=device).to(dtype).transpose(1, 2)
    return qkv[0], qkv[1, :, :k_heads]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["packed_heads", "flat_rows", "heads_major"])
def test_rope_strided_views_of_fused_qkv(kind, dtype, device):
    torch.manual_seed(2)
    q, k = fused_qkv_views(kind, 37, 6, 2, 64, dtype, device)
    assert not q.is_contiguous() and not k.is_contiguous()
    pos2 = grid_positions([(5, 7), (1, 2)], device)
    check_rope(ops.rope_2d, q, k, pos2, 10000.0, dtype)
    pos1 = torch.randint(0, 131072, (37,), dtype=torch.int32, device=device)
    check_rope(ops.rope_1d, q, k, pos1, 1e9, dtype)


def test_rope_positions_may_be_strided(device):
    """pos as a view (every other row of a larger table; 1-D from a column)."""
    torch.manual_seed(3)
    table = grid_positions([(6, 7), (4, 8)], device)
    pos = table[::2]
    q = torch.randn(pos.shape[0], 2, 64, device=device)
    k = torch.randn(pos.shape[0], 1, 64, device=device)
    check_rope(ops.rope_2d, q, k, pos, 10000.0, torch.float32)
    pos1 = table[:, 1][::2]
    assert pos1.stride(0) != 1
    check_rope(ops.rope_1d, q, k, pos1, 1e9, torch.float32)


def rotation_angles(out: torch.Tensor) -> torch.Tensor:
    """The angle each pair of `out` was turned by, given the input pairs were (1, 0)."""
    pairs = out.double().unflatten(-1, (-1, 2))
    return torch.atan2(pairs[..., 1], pairs[..., 0])


def wrapped(diff: torch.Tensor) -> torch.Tensor:
    return torch.remainder(diff + math.pi, 2 * math.pi) - math.pi


@pytest.mark.parametrize("theta", [10000.0, 100.0])
def test_rope_2d_angle_closed_form(theta, device):
    """DESIGN §1, computed here from scratch in fp64: pair i < 16 turns by row * theta^(-4i/64),
    pair i >= 16 by col * theta^(-(4(i-16)+2)/64)."""
    grids = [(64, 64)]
    pos = grid_positions(grids, device)[::37]  # 111 patches spread over a full 64x64 image
    n, dim = pos.shape[0], 64
    unit = torch.zeros(n, 1, dim, device=device)
    unit[..., 0::2] = 1.0
    q_out, k_out = ops.rope_2d(unit, unit.clone(), pos, theta)
    i = torch.arange(dim // 2, device=device, dtype=torch.float64)
    exponent = torch.where(i < 16, 4 * i, 4 * (i - 16) + 2) / dim
    which = torch.where(i < 16, pos[:, 0:1].double(), pos[:, 1:2].double())
    expected = which * theta ** (-exponent)
    for out in (q_out, k_out):
        # fp32 angles (|a| < 64 rad, 2^-24 relative) and fp32 cos/sin: well under 2e-5 rad
        err = wrapped(rotation_angles(out)[:, 0] - expected).abs().max().item()
        assert err < 2e-5, f"rotation angle off by {err:.3g} rad"
        assert torch.allclose(out.double().unflatten(-1, (-1, 2)).norm(dim=-1),
                              torch.ones((), dtype=torch.float64, device=device), atol=1e-6)


@pytest.mark.parametrize("rope,pos_shape", [(ops.rope_1d, (256,)), (ops.rope_2d, (256, 2))], ids=["1d", "2d"])
def test_rope_huge_angles_closed_form(rope, pos_shape, device):
    """head_dim 128, theta 1e9, positions up to 131071 (pair 0 turns by 131071 rad): the kernel
    rotates by the closed-form fp32 angle pos * f_i (frequencies from theta here, not from
    pixtral_fast), reduced modulo 2 pi, with cos/sin accurate to a few fp32 ulps (256 positions
    x 64 pairs cover every quadrant and the whole reduced interval). One ulp off in any f_i
    (a GPU pow) moves these angles by up to 1e-2 rad."""
    g = torch.Generator().manual_seed(7)
    pos = torch.randint(0, 131072, pos_shape, generator=g, dtype=torch.int32)
    pos[0], pos[1] = 131071, 0
    pos = pos.to(device)
    unit = torch.zeros(pos.shape[0], 1, 128, device=device)
    unit[..., 0::2] = 1.0
    q_out, _ = rope(unit, unit, pos, 1e9)
    angle = closed_form_angles(pos, 128, 1e9)
    pairs = q_out.double().cpu().unflatten(-1, (-1, 2))[:, 0]
    # 3e-7: ~4 ulps of fp32 near 1 (the interpreter reaches 8e-8)
    torch.testing.assert_close(pairs[..., 0], angle.cos(), atol=3e-7, rtol=0)
    torch.testing.assert_close(pairs[..., 1], angle.sin(), atol=3e-7, rtol=0)


@pytest.mark.parametrize("theta", [1e9, 1e4, 1e6])
@pytest.mark.parametrize("head_dim", [128, 64, 40])
def test_reference_frequencies_are_rounded_fp64(head_dim, theta, device):
    """reference.rope_frequencies (the model's, the reference's and the kernels' inv_freq) is
    theta^(-2i/D) computed in fp64 and rounded once to fp32, bit for bit, on any device."""
    f = reference.rope_frequencies(head_dim, theta, device)
    assert f.dtype == torch.float32 and f.device.type == torch.device(device).type
    assert torch.equal(f.cpu().double(), frequencies(head_dim, theta))


def test_reference_rope_matches_closed_form(device):
    """The plain-PyTorch twins (the reference backend and every other test's oracle) against the
    closed form, 1-D at the decoder's theta and long positions, 2-D on the ViT's grid."""
    torch.manual_seed(8)
    pos1 = torch.randint(0, 131072, (33,), dtype=torch.int32, device=device)
    pos2 = grid_positions([(7, 5)], device)[:33]
    q = torch.randn(33, 2, 128, device=device, dtype=torch.float64)
    for rope, pos, theta in ((reference.rope_1d, pos1, 1e9), (reference.rope_2d, pos2, 1e4)):
        out, _ = rope(q, q, pos, theta)
        torch.testing.assert_close(out.cpu(), rotate(q, closed_form_angles(pos, 128, theta)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("head_dim", [8, 24, 40, 72, 96, 200, 256])
def test_rope_padded_head_dims(head_dim, device):
    """Head dims that are not powers of two (padded inside, masked), both RoPEs, GQA."""
    torch.manual_seed(head_dim)
    pos1 = torch.randint(0, 131072, (9,), dtype=torch.int32, device=device)
    pos2 = grid_positions([(2, 3), (1, 3)], device)
    q = torch.randn(9, 3, head_dim, device=device)
    k = torch.randn(9, 1, head_dim, device=device)
    check_rope(ops.rope_1d, q, k, pos1, 1e9, torch.float32)
    check_rope(ops.rope_2d, q, k, pos2, 1e4, torch.float32)


def test_rope_beyond_kernel_head_dims_falls_back(device, caplog):
    """head_dim 264 (> 256): the op runs the reference, and says so once."""
    q = torch.randn(3, 2, 264, device=device)
    pos = torch.arange(3, dtype=torch.int32, device=device)
    with caplog.at_level("WARNING", logger="pixtral_fast"):
        q_out, _ = ops.rope_1d(q, q, pos, 1e9)
        ops.rope_1d(q, q, pos, 1e9)
    assert sum("head_dim 264" in r.getMessage() for r in caplog.records) == 1
    assert_close(q_out.cpu(), rotate(q, closed_form_angles(pos, 264, 1e9)), torch.float32)


def test_rope_opcheck(device):
    torch.manual_seed(4)
    pos = grid_positions([(2, 3), (1, 2)], device)
    q = torch.randn(8, 2, 64, device=device)
    k = torch.randn(8, 1, 64, device=device)
    torch.library.opcheck(torch.ops.pixtral_fast.rope_2d.default, (q, k, pos, 10000.0))
    torch.library.opcheck(torch.ops.pixtral_fast.rope_1d.default, (q, k, pos[:, 1].contiguous(), 1e9))


# ---------------------------------------------------------------------------------------------
# real model shapes (GPU only)


@pytest.mark.gpu
def test_rope_2d_vit_shape_gpu(device):
    """One 1024x1024 image: 4096 patches x 16 heads x 64, q and k as views of a fused qkv."""
    torch.manual_seed(5)
    qkv = torch.randn(4096, 48, 64, device=device, dtype=torch.bfloat16)
    q, k = qkv[:, :16], qkv[:, 16:32]
    check_rope(ops.rope_2d, q, k, grid_positions([(64, 64)], device), 10000.0,
               torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rope_1d_decoder_shape_gpu(dtype, device):
    """NeMo prefill: 32 query / 8 KV heads x 128, positions up to 131071, theta 1e9."""
    torch.manual_seed(6)
    qkv = torch.randn(4160, 48, 128, device=device, dtype=dtype)
    q, k = qkv[:, :32], qkv[:, 32:40]
    pos = torch.randint(0, 131072, (4160,), dtype=torch.int32, device=device)
    pos[0] = 131071
    check_rope(ops.rope_1d, q, k, pos, 1e9, dtype)
