"""Every public op rejects bad input with a ValueError that names the argument, before any launch."""
import pytest
import torch

from pixtral_fast import ops
from tests.conftest import DEVICE

F32, BF16 = torch.float32, torch.bfloat16


def t(*shape, dtype=F32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def raises(match):
    return pytest.raises(ValueError, match=match)


# -- rope_2d ----------------------------------------------------------------------------------------

def test_rope_2d_bad_inputs():
    q, k, pos = t(5, 2, 64), t(5, 2, 64), i32([[0, 0]] * 5)
    with raises("q must have 3 dimensions"):
        ops.rope_2d(q[0], k, pos)
    with raises("k has dtype torch.bfloat16 but q has torch.float32"):
        ops.rope_2d(q, k.to(BF16), pos)
    with raises(r"pos must have dtype in \['torch.int32'\]"):
        ops.rope_2d(q, k, pos.long())
    with raises(r"pos must have shape \(5, 2\)"):
        ops.rope_2d(q, k, i32([[0, 0]] * 4))
    with raises("q head_dim 6 must be a multiple of 4 for RoPE-2D"):
        ops.rope_2d(t(5, 2, 6), t(5, 2, 6), pos)
    with raises("q head_dim 7 must be even for RoPE"):
        ops.rope_1d(t(5, 2, 7), t(5, 2, 7), pos[:, 0].contiguous())
    with raises("q must be contiguous in its last dimension"):
        ops.rope_2d(t(5, 2, 128)[..., ::2], k, pos)
    with raises("k .* must match q"):
        ops.rope_2d(q, t(4, 2, 64), pos)
    with raises("q must have dtype in"):
        ops.rope_2d(q.double(), k.double(), pos)
    with raises(r"pos must have shape \(5,\)"):
        ops.rope_1d(q, k, pos)


# -- varlen_attention -------------------------------------------------------------------------------

def attn_args(**over):
    args = dict(q=t(7, 4, 64), k=t(7, 2, 64), v=t(7, 2, 64), cu_seqlens=i32([0, 3, 7]), max_seqlen=4)
    return args | over


@pytest.mark.parametrize("over, match", [
    (dict(q=t(7, 4, 64, 1)), "q must have 3 dimensions"),
    (dict(k=t(7, 2, 64, dtype=BF16)), "k has dtype torch.bfloat16 but q has torch.float32"),
    (dict(v=t(7, 2, 32)), r"k \(7, 2, 64\) and v \(7, 2, 32\) must have the same shape"),
    (dict(q=t(7, 4, 0), k=t(7, 2, 0), v=t(7, 2, 0)), "q has head_dim 0"),
    (dict(k=t(7, 3, 64), v=t(7, 3, 64)), r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    (dict(v=t(7, 1, 64)), "k .* and v .* must have the same shape"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], device=DEVICE)), r"cu_seqlens must have dtype in \['torch.int32'\]"),
    (dict(cu_seqlens=i32([0, 5, 3, 7])), "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=i32([0, 3, 6])), "cu_seqlens must start at 0 and end at total_tokens=7"),
    (dict(cu_seqlens=i32([[0, 7]])), "cu_seqlens must have 1 dimensions"),
    (dict(max_seqlen=3), "max_seqlen=3 is smaller than the longest sequence"),
    (dict(max_seqlen=4.0), "max_seqlen must be a non-negative int"),
    (dict(q=t(7, 4, 128)[..., ::2]), "q must be contiguous in its last dimension"),
])
def test_varlen_attention_bad_inputs(over, match):
    with raises(match):
        ops.varlen_attention(**attn_args(**over))


def test_varlen_attention_bad_pos():
    with raises("q head_dim 10 must be a multiple of 4 for RoPE-2D"):
        ops.varlen_attention(**attn_args(q=t(7, 4, 10), k=t(7, 2, 10), v=t(7, 2, 10)), pos=i32([[0, 0]] * 7))
    with raises(r"pos must have shape \(7, 2\)"):
        ops.varlen_attention(**attn_args(), pos=i32([[0, 0]] * 6))
    with raises("pos must have dtype"):
        ops.varlen_attention(**attn_args(), pos=torch.zeros(7, 2, device=DEVICE))


# -- gated_ffn --------------------------------------------------------------------------------------

def test_gated_ffn_bad_inputs():
    x, wg, wu, wd = t(3, 16), t(32, 16), t(32, 16), t(16, 32)
    with raises("activation must be one of"):
        ops.gated_ffn(x, wg, wu, wd, "relu")
    with raises("w_up has dtype"):
        ops.gated_ffn(x, wg, wu.to(BF16), wd)
    with raises(r"w_gate \(32, 16\) and w_up \(32, 15\) must both be"):
        ops.gated_ffn(x, wg, t(32, 15), wd)
    with raises(r"w_down \(16, 31\) must be \[out, 32\]"):
        ops.gated_ffn(x, wg, wu, t(16, 31))
    with raises("w_down must be contiguous"):
        ops.gated_ffn(x, wg, wu, t(32, 16).T)
    with raises(r"x must be \[..., dim\]"):
        ops.gated_ffn(x[0], wg, wu, wd)
    with raises("x must be contiguous in its last dimension"):
        ops.gated_ffn(t(16, 3).T, wg, wu, wd)


# -- gqa_decode_attention ---------------------------------------------------------------------------

def decode_args(**over):
    args = dict(q=t(2, 8, 64, dtype=BF16), k_cache=t(6, 16, 2, 64, dtype=BF16), v_cache=t(6, 16, 2, 64, dtype=BF16),
                block_table=i32([[1, 2], [3, 4]]), seq_lens=i32([20, 32]))
    return args | over


@pytest.mark.parametrize("over, match", [
    (dict(q=t(2, 8, 64, 1, dtype=BF16)), "q must have 3 dimensions"),
    (dict(k_cache=t(6, 16, 2, 64)), "k_cache has dtype torch.float32 but q has torch.bfloat16"),
    (dict(v_cache=t(6, 16, 1, 64, dtype=BF16)), "k_cache .* and v_cache .* differ"),
    (dict(k_cache=t(6, 16, 2, 32, dtype=BF16), v_cache=t(6, 16, 2, 32, dtype=BF16)),
     "k_cache head_dim 32 != q head_dim 64"),
    (dict(k_cache=t(6, 12, 2, 64, dtype=BF16), v_cache=t(6, 12, 2, 64, dtype=BF16)), "block_size 12 must be one of"),
    (dict(q=t(2, 7, 64, dtype=BF16)), r"q heads \(7\) must be a multiple of k_cache heads \(2\)"),
    (dict(block_table=i32([[1, 2]])), "block_table has 1 rows but q has batch 2"),
    (dict(seq_lens=torch.tensor([20, 32], device=DEVICE)), "seq_lens must have dtype"),
    (dict(seq_lens=i32([20, 33])), "seq_lens has 33 tokens but block_table holds at most 2 blocks x 16 = 32"),
    (dict(seq_lens=i32([0, 5])), "seq_lens must be >= 1"),
    (dict(block_table=i32([[1, 6], [3, 4]])), r"block_table references block ids outside \[0, 6\)"),
    (dict(block_table=i32([[1, -1], [3, 4]])), r"block_table references block ids outside \[0, 6\)"),
    (dict(k_cache=t(6, 16, 2, 64, dtype=BF16).transpose(0, 1).contiguous().transpose(0, 1)), "k_cache must be contiguous"),
])
def test_gqa_decode_bad_inputs(over, match):
    with raises(match):
        ops.gqa_decode_attention(**decode_args(**over))


def test_unused_block_table_entries_are_not_checked():
    """Entries past a sequence's length may hold anything (a padded table): not an error."""
    args = decode_args(block_table=i32([[1, 99], [3, 4]]), seq_lens=i32([16, 32]))
    assert ops.gqa_decode_attention(**args).shape == (2, 8, 64)


# -- device -----------------------------------------------------------------------------------------

def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr("pixtral_fast.kernels.INTERPRETING", False)
    cpu = dict(device="cpu")
    q = torch.randn(3, 2, 64, **cpu)
    with raises("q is on cpu: pixtral_fast kernels need a CUDA device, or TRITON_INTERPRET=1"):
        ops.rope_2d(q, q, torch.zeros(3, 2, dtype=torch.int32))
    with raises("x is on cpu"):
        ops.gated_ffn(torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 4))
    with raises("q is on cpu"):
        ops.varlen_attention(q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3)


@pytest.mark.gpu
def test_mixed_devices():
    q = torch.randn(3, 2, 64, device="cuda")
    with raises("k is on cpu but q is on cuda"):
        ops.rope_2d(q, q.cpu(), torch.zeros(3, 2, dtype=torch.int32, device="cuda"))
    with raises("pos is on cpu but q is on cuda"):
        ops.rope_2d(q, q, torch.zeros(3, 2, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_every_op_launches_on_its_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: each op runs on cuda:1 (a launch on the wrong
    device reads foreign memory or fails) and matches the same op run with cuda:1 current."""
    dev = torch.device("cuda:1")
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dev, torch.bfloat16)  # noqa: E731
    q, k, v = rnd(40, 4, 128), rnd(40, 2, 128), rnd(40, 2, 128)
    pos1 = torch.arange(40, dtype=torch.int32, device=dev)
    pos2 = torch.stack([pos1 // 8, pos1 % 8], -1).contiguous()
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=dev)
    x, wg, wu, wd = rnd(5, 64), rnd(96, 64), rnd(96, 64), rnd(64, 96)
    kc, vc = rnd(6, 16, 2, 128), rnd(6, 16, 2, 128)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=dev)
    lens = torch.tensor([40, 7], dtype=torch.int32, device=dev)
    calls = {
        "rope_1d": (q, k, pos1, 1e9), "rope_2d": (q, k, pos2, 1e4),
        "varlen_attention": (q, k, v, cu, 25, None, True, pos2),
        "gated_ffn": (x, wg, wu, wd, "silu"), "gqa_decode_attention": (q[:2], kc, vc, table, lens),
    }
    with torch.cuda.device(0):
        got = {name: getattr(ops, name)(*args) for name, args in calls.items()}
    with torch.cuda.device(1):
        expected = {name: getattr(ops, name)(*args) for name, args in calls.items()}
    torch.cuda.synchronize(dev)
    for name in calls:
        outs = got[name] if isinstance(got[name], tuple) else (got[name],)
        refs = expected[name] if isinstance(expected[name], tuple) else (expected[name],)
        for out, ref in zip(outs, refs):
            assert out.device == dev, name
            assert torch.equal(out, ref), name


# -- scalar arguments: theta / scale ----------------------------------------------------------------

BAD_POSITIVE_REALS = [float("nan"), float("inf"), -1.0, 0.0, "1e4", True, None, torch.tensor(2.0)]


@pytest.mark.parametrize("bad", BAD_POSITIVE_REALS, ids=repr)
def test_theta_and_scale_must_be_finite_positive_reals(bad):
    """A NaN / negative / str theta or scale used to run and return NaN (or garbage) silently."""
    q, k, pos = t(5, 2, 64), t(5, 2, 64), i32([[0, 0]] * 5)
    with raises("theta must be a finite real number > 0"):
        ops.rope_2d(q, k, pos, bad)
    with raises("theta must be a finite real number > 0"):
        ops.rope_1d(q, k, pos[:, 0].contiguous(), bad)
    with raises("rope_theta must be a finite real number > 0"):
        ops.varlen_attention(**attn_args(), rope_theta=bad)
    if bad is not None:  # scale=None means the default head_dim ** -0.5
        with raises("scale must be a finite real number > 0"):
            ops.varlen_attention(**attn_args(), scale=bad)
        with raises("scale must be a finite real number > 0"):
            ops.gqa_decode_attention(**decode_args(), scale=bad)


def test_integer_and_numpy_theta_and_scale_are_accepted():
    import numpy as np
    q, k, pos = t(5, 2, 64), t(5, 2, 64), i32([[0, 0]] * 5)
    a, _ = ops.rope_2d(q, k, pos, 10000)
    b, _ = ops.rope_2d(q, k, pos, np.float64(10000.0))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    out = ops.gqa_decode_attention(**decode_args(), scale=1)
    assert torch.isfinite(out).all()
