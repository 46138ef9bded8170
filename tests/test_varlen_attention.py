"""Packed variable-length attention (kernels/varlen_attention.py) against the fp64 oracle.

Inputs are rounded to the tested dtype first, then the oracle (written here in fp64, RoPE from
its closed form, independent of pixtral_fast.reference) runs on the same values. Packings mimic the ViT: several images of different
patch grids, each with its own (row, col) grid restarting at (0, 0), zero-length and
single-token sequences, one sequence longer than the interpreter's 64-query / 32-key tiles.
On CPU the kernel runs under the interpreter; gpu-marked tests use real shapes and run every
shipped config of the device.
"""
import pytest
import torch

from pixtral_fast import ops
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


def closed_form_rope_2d(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """DESIGN §1 written out here in fp64, independent of pixtral_fast: f_j = theta^(-2j/D);
    pair i < D/4 turns by row * f_{2i}, pair i >= D/4 by col * f_{2(i - D/4) + 1}. The op's
    angles are fp32 (as Mistral's): f_j rounded once to fp32, the product rounded to fp32 (the
    fp64 product of an integer < 2^24 and an fp32 is exact), which matters at large positions."""
    d = x.shape[-1]
    f = torch.tensor([theta ** (-(2 * j) / d) for j in range(d // 2)], dtype=torch.float64).float().double()
    pos = pos.cpu().double()
    angle = torch.cat([pos[:, :1] * f[0::2], pos[:, 1:] * f[1::2]], dim=-1).float().double()
    angle = angle[:, None, :].to(x.device)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = angle.cos(), angle.sin()
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def oracle(q, k, v, cu, max_seqlen=None, causal=False, pos=None, scale=None, rope_theta=10000.0):
    """fp64 attention inside each packed sequence, written here (not pixtral_fast.reference).
    With `pos`, q and k are rotated in fp64 and, for fp16/bf16, rounded to their dtype: the op is
    rope_2d followed by attention, and the kernel feeds its tensor-core dots rotated q/k in the
    input dtype (on these peaked logits that rounding alone moves the output by ~1x TOL)."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    if pos is not None:
        q, k = closed_form_rope_2d(q, pos, rope_theta), closed_form_rope_2d(k, pos, rope_theta)
        if dtype != torch.float32:
            q, k = q.to(dtype).double(), k.to(dtype).double()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n == 0:
            continue
        kv_of_head = torch.arange(q.shape[1], device=q.device) // group
        ks, vs = k[start:end][:, kv_of_head], v[start:end][:, kv_of_head]  # [n, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q[start:end], ks) * scale
        if causal:
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16: test_enumerated_cases
def test_matches_oracle(case, dtype, device):
    run_case(case, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # pairs read as 64- and 32-bit words
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


# Every combination of causal x RoPE x (KV heads, group) x dtype on one packing: a 70-token image
# (two query tiles of the interpreter's 64, a ragged key tile of its 32) beside a 1-token one, an
# empty one and a 6-token one.
ENUM_GRIDS = [(1, 1), (2, 3), (0, 0), (5, 14)]
ENUM_HEADS = [(2, 1), (1, 3), (2, 2)]  # (kv_heads, group): MHA, MQA, GQA with several KV heads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads,group", ENUM_HEADS)
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_enumerated_cases(causal, rope, kv_heads, group, dtype, device):
    cu, max_seqlen, pos = pack_grids(ENUM_GRIDS, device)
    q, k, v = make_qkv(pos.shape[0], kv_heads * group, kv_heads, 64, dtype, device, seed=kv_heads * 10 + group)
    pos = pos if rope else None
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, causal=causal, pos=pos)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, oracle(q, k, v, cu, max_seqlen, causal, pos), dtype)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_packings(seed, dtype, device):
    """Random images (grids up to 13x13, some empty), head_dim, GQA ratio; causal and RoPE
    alternate with the seed so that every draw set holds both."""
    gen = torch.Generator().manual_seed(100 + seed)
    pick = lambda options: options[torch.randint(len(options), (1,), generator=gen).item()]  # noqa: E731
    grids = [tuple(torch.randint(0, 14, (2,), generator=gen).tolist()) for _ in range(pick([1, 2, 3, 5]))]
    grids = [(h, w) if h and w else (0, 0) for h, w in grids] + [(1, 1)]
    head_dim, kv_heads, group = pick([64, 128, 40]), pick([1, 2]), pick([1, 2, 4])
    causal, rope = seed % 2 == 0, seed < 2
    cu, max_seqlen, pos = pack_grids(grids, device)
    q, k, v = make_qkv(pos.shape[0], kv_heads * group, kv_heads, head_dim, dtype, device, seed=seed)
    pos = pos if rope else None
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, causal=causal, pos=pos)
    case = f"grids={grids} D={head_dim} Hkv={kv_heads} group={group} causal={causal} rope={rope}"
    assert_close(out, oracle(q, k, v, cu, max_seqlen, causal, pos), dtype, msg=lambda m: f"{case}\n{m}")


# head_dim: any multiple of 8 up to 256, padded inside to a power of two (16..256) and masked.
HEAD_DIMS = [8, 40, 72, 80, 96, 104, 112, 160, 256]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims_causal_gqa(head_dim, device):
    """Decoder-like: causal, 2 KV heads x group 2, no RoPE, fp32."""
    cu, max_seqlen, pos = pack_grids([(5, 9), (1, 1), (2, 7)], device)
    q, k, v = make_qkv(pos.shape[0], 4, 2, head_dim, torch.float32, device, seed=head_dim)
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, causal=True)
    assert_close(out, oracle(q, k, v, cu, max_seqlen, causal=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [8, 40, 80, 104, 256])
def test_head_dims_rope(head_dim, dtype, device):
    """ViT-like: RoPE-2D in the kernel (the row/column split at D/4 of the real head_dim), GQA 2."""
    cu, max_seqlen, pos = pack_grids([(4, 9), (1, 1), (3, 3)], device)
    q, k, v = make_qkv(pos.shape[0], 2, 1, head_dim, dtype, device, seed=head_dim + 1)
    out = ops.varlen_attention(q, k, v, cu, max_seqlen, pos=pos)
    assert_close(out, oracle(q, k, v, cu, max_seqlen, pos=pos), dtype)


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
@pytest.mark.parametrize("head_dim", [64, 128, 256, 80, 40])
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
