"""Packed variable-length attention (kernels/varlen_attention.py) against the fp64 oracle.

Inputs are rounded to the tested dtype first, then the oracle (`reference.varlen_attention`)
runs on fp64 copies of the same values. Packings mimic the ViT: several images of different
patch grids, each with its own (row, col) grid restarting at (0, 0), zero-length and
single-token sequences, one sequence longer than the interpreter's 64-query / 32-key tiles.
On CPU the kernel runs under the interpreter; gpu-marked tests use real shapes and run every
shipped config of the device.
"""
import pytest
import torch

from pixtral_fast import ops, reference
from pixtral_fast.kernels import varlen_attention as kernel
from tests.conftest import DTYPES
from tests.tolerances import assert_close


def pack_grids(grids, device):
    """cu_seqlens, max_seqlen and pos for images of patch grids (h, w); (0, 0) is a zero-length
    sequence. Each image's pos is its own row-major (row, col) grid."""
    lengths = [h * w for h, w in grids]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    pos = [torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
           for h, w in grids]
    pos = torch.cat(pos).to(torch.int32)
    return cu.to(device), max(lengths), pos.to(device)


def make_qkv(n_tokens, q_heads, kv_heads, head_dim, dtype, device, seed=0, fused=False):
    """q, k, v; fused: strided views into one [T, Hq + 2 Hkv, D] tensor, as a fused QKV
    projection leaves them."""
    gen = torch.Generator().manual_seed(seed)
    heads = q_heads + 2 * kv_heads
    # Scaled up so that the softmax is peaked and the online max really moves between tiles.
    qkv = (1.5 * torch.randn(n_tokens, heads, head_dim, generator=gen)).to(dtype).to(device)
    if not fused:
        return (qkv[:, :q_heads].contiguous(), qkv[:, q_heads:q_heads + kv_heads].contiguous(),
                qkv[:, q_heads + kv_heads:].contiguous())
    return qkv[:, :q_heads], qkv[:, q_heads:q_heads + kv_heads], qkv[:, q_heads + kv_heads:]


def oracle(q, k, v, cu, max_seqlen, causal=False, pos=None, scale=None, rope_theta=10000.0):
    """The reference in fp64. With `pos`, fp16/bf16 q and k are first rotated by
    `reference.rope_2d` in their own dtype: the op is rope_2d followed by attention, and rope_2d
    returns the rotated q/k rounded to the input dtype (so does the kernel, for its tensor-core
    dots). On these peaked logits that rounding alone moves the bf16/fp16 output by up to ~1.1x
    TOL from an unrounded fp64 rotation, while the kernel's own error is ~0.2x TOL. fp32 is
    checked against the rotation in fp64."""
    if pos is not None and q.dtype != torch.float32:
        q, k = reference.rope_2d(q, k, pos, rope_theta)
        pos = None
    return reference.varlen_attention(q.double(), k.double(), v.double(), cu, max_seqlen, scale, causal, pos,
                                      rope_theta)


# name: (head_dim, q_heads, kv_heads, causal, rope, grids)
CASES = {
    # five images 1x1 .. 7x13 and an empty sequence: the ViT's block-diagonal attention
    "images_d64": (64, 2, 2, False, True, [(1, 1), (3, 5), (0, 0), (7, 13), (2, 9), (11, 4)]),
    # a 150-token image (3 query tiles, a ragged last key tile) beside tiny ones, GQA 4
    "images_gqa4_d128": (128, 4, 1, False, True, [(2, 9), (1, 1), (10, 15)]),
    # decoder-like: causal GQA, one 203-token prompt, no RoPE
    "causal_gqa4_d128": (128, 4, 1, True, False, [(1, 1), (7, 29), (0, 0), (1, 3)]),
    "causal_rope_d64": (64, 2, 2, True, True, [(7, 13), (1, 1), (3, 5)]),
    "plain_gqa4_d64": (64, 4, 1, False, False, [(0, 0), (10, 13), (1, 1), (5, 13)]),
}


def run_case(name, dtype, device, fused=False):
    head_dim, q_heads, kv_heads, causal, rope, grids = CASES[name]
    cu, max_seqlen, pos = pack_grids(grids, device)
    q, k, v = make_qkv(pos.shape[0], q_heads, kv_heads, head_dim, dtype, device, fused=fused)
    pos = pos if rope else None
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, causal=causal, pos=pos)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, oracle(q, k, v, cu, max_seqlen, causal, pos), dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(case, dtype, device):
    run_case(case, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_views(dtype, device):
    """q/k/v as strided views of one fused QKV tensor: no copies, same answer."""
    run_case("images_gqa4_d128", dtype, device, fused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_strides(dtype, device):
    """Odd token and head strides and an odd base offset (pairs not word-aligned): the kernel
    falls back to element loads for the rotated pairs."""
    cu, max_seqlen, pos = pack_grids([(3, 5), (1, 1), (6, 11)], device)
    n, heads, d = pos.shape[0], 3, 64
    gen = torch.Generator().manual_seed(3)
    buf = torch.randn(n * heads * (d + 1) + 3, generator=gen).to(dtype).to(device)
    q, k, v = (buf[i:].as_strided((n, heads, d), (heads * (d + 1), d + 1, 1)) for i in (1, 2, 3))
    assert not kernel._pairs_aligned(q, k)
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, pos=pos)
    assert_close(out, oracle(q, k, v, cu, max_seqlen, pos=pos), dtype)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_packings(seed, dtype, device):
    """Random images (grids up to 13x13, some empty), head_dim, GQA ratio, causal and RoPE."""
    gen = torch.Generator().manual_seed(100 + seed)
    pick = lambda options: options[torch.randint(len(options), (1,), generator=gen).item()]  # noqa: E731
    n_images = pick([1, 2, 3, 5])
    grids = [tuple(torch.randint(0, 14, (2,), generator=gen).tolist()) for _ in range(n_images)]
    grids = [(h, w) if h and w else (0, 0) for h, w in grids]
    if not any(h for h, _ in grids):
        grids.append((1, 1))
    head_dim, kv_heads, group = pick([64, 128]), pick([1, 2]), pick([1, 2, 4])
    causal, rope = pick([False, True]), pick([False, True])
    cu, max_seqlen, pos = pack_grids(grids, device)
    q, k, v = make_qkv(pos.shape[0], kv_heads * group, kv_heads, head_dim, dtype, device, seed=seed)
    pos = pos if rope else None
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, causal=causal, pos=pos)
    case = f"grids={grids} D={head_dim} Hkv={kv_heads} group={group} causal={causal} rope={rope}"
    assert_close(out, oracle(q, k, v, cu, max_seqlen, causal, pos), dtype, msg=lambda m: f"{case}\n{m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_inside_equals_rope_then_attention(dtype, device):
    """`pos=` gives what ops.rope_2d followed by plain attention gives."""
    cu, max_seqlen, pos = pack_grids([(7, 13), (1, 1), (2, 9)], device)
    q, k, v = make_qkv(pos.shape[0], 4, 2, 64, dtype, device, seed=4)
    fused = ops.varlen_attention(q, k, v, cu, max_seqlen, pos=pos)
    q_rot, k_rot = ops.rope_2d(q, k, pos)
    assert_close(fused, ops.varlen_attention(q_rot, k_rot, v, cu, max_seqlen), dtype)
    q_ref, k_ref = reference.rope_2d(q, k, pos)
    assert_close(fused, ops.varlen_attention(q_ref, k_ref, v, cu, max_seqlen), dtype)


# (BLOCK_M, BLOCK_N, warps, stages): square tiles (the causal diagonal in one key tile), BLOCK_M =
# 2 BLOCK_N, and tiles larger than every sequence.
@pytest.mark.parametrize("config", [(16, 16, 4, 1), (32, 16, 4, 1), (128, 64, 4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_shapes(config, causal, device):
    cu, max_seqlen, pos = pack_grids([(5, 11), (1, 1), (0, 0), (4, 4)], device)
    q, k, v = make_qkv(pos.shape[0], 2, 1, 64, torch.float32, device, seed=5)
    # A max_seqlen above the longest sequence only launches programs that exit at once.
    out = kernel.varlen_attention(q, k, v, cu, max_seqlen + 40, 0.125, causal, pos, 10000.0, config=config)
    assert_close(out, oracle(q, k, v, cu, max_seqlen, causal, pos, 0.125), torch.float32)


def test_scale_and_theta(device):
    cu, max_seqlen, pos = pack_grids([(9, 7), (2, 2)], device)
    q, k, v = make_qkv(pos.shape[0], 2, 2, 64, torch.float32, device, seed=6)
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, scale=0.3, pos=pos, rope_theta=100.0)
    assert_close(out, oracle(q, k, v, cu, max_seqlen, pos=pos, scale=0.3, rope_theta=100.0), torch.float32)


def test_large_positions(device):
    """Angles up to ~1e3 rad (positions far beyond the ViT's 64): the in-kernel sin/cos range
    reduction stays exact."""
    cu, max_seqlen, pos = pack_grids([(4, 8)], device)
    pos = pos * 37 + 500
    q, k, v = make_qkv(pos.shape[0], 1, 1, 64, torch.float32, device, seed=7)
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, pos=pos)
    assert_close(out, oracle(q, k, v, cu, max_seqlen, pos=pos), torch.float32)


def test_no_tokens(device):
    q = torch.empty(0, 2, 64, device=device)
    cu = torch.zeros(3, dtype=torch.int32, device=device)
    out = ops.varlen_attention(q, q[:, :1], q[:, :1], cu, 0)
    assert out.shape == (0, 2, 64)


def test_opcheck(device):
    cu, max_seqlen, pos = pack_grids([(2, 3), (1, 1)], device)
    q, k, v = make_qkv(pos.shape[0], 2, 1, 64, torch.float32, device, seed=8)
    torch.library.opcheck(torch.ops.pixtral_fast.varlen_attention.default,
                          (q, k, v, cu, max_seqlen, 0.125, False, pos, 10000.0))


# ---------------------------------------------------------------------------------------------
# GPU only: real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vit_4096_image_with_tiny_ones(dtype):
    """One 1024x1024 image (64x64 patches) packed with three tiny ones; 16 heads x 64."""
    cu, max_seqlen, pos = pack_grids([(1, 1), (64, 64), (3, 5), (2, 9)], "cuda")
    q, k, v = make_qkv(pos.shape[0], 16, 16, 64, dtype, "cuda", fused=True)
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, scale=0.125, pos=pos)
    assert_close(out, oracle(q, k, v, cu, max_seqlen, pos=pos, scale=0.125), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_prefill(dtype):
    """NeMo's 32 query / 8 KV heads x 128, causal, a ~4K-token prompt beside short ones."""
    lengths = [4000, 1, 95]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    q, k, v = make_qkv(sum(lengths), 32, 8, 128, dtype, "cuda", fused=True)
    out = ops.varlen_attention(q, k, v, cu, max(lengths), causal=True)
    assert_close(out, oracle(q, k, v, cu, max(lengths), causal=True), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp16 ships bf16's configs
def test_every_shipped_config(dtype, head_dim, rope):
    """Each autotune candidate of this GPU, forced, on fused-QKV views, in the mode the model
    runs it: RoPE without causal masking (the ViT), causal without RoPE (decoder prefill)."""
    major, minor = torch.cuda.get_device_capability()
    cu, max_seqlen, pos = pack_grids([(20, 23), (1, 1), (0, 0), (3, 5), (9, 9)], "cuda")
    q, k, v = make_qkv(pos.shape[0], 8, 2, head_dim, dtype, "cuda", seed=9, fused=True)
    pos = pos if rope else None
    scale = head_dim ** -0.5
    causal = not rope
    expected = oracle(q, k, v, cu, max_seqlen, causal, pos, scale)
    for config in kernel._candidates(major * 10 + minor, dtype, head_dim, rope):
        out = kernel.varlen_attention(q, k, v, cu, max_seqlen, scale, causal, pos, 10000.0, config=config)
        assert_close(out, expected, dtype, msg=lambda m, c=config: f"config {c} causal={causal}\n{m}")
