"""Paged GQA decode attention (kernels/decode_attention.py) against the fp64 oracle.

On CPU the Triton kernel runs under the interpreter; on a GPU the same unmarked tests go through
pixtral_fast.ops (CUDA extension or Triton twin), and the gpu-marked ones pin the Triton twin
and check CUDA-graph capture with block tables and lengths swapped between replays.
"""
import pytest
import torch

from pixtral_fast import ops
from pixtral_fast.kernels import decode_attention as kernel
from tests.conftest import DTYPES
from tests.support.paged_cases import check_graph_replay, make_case, oracle
from tests.tolerances import assert_close

# (head_dim, kv_heads, group, block_size, seq_lens): every case mixes 1, block_size +- 1 and a
# longer context; groups 1, 4, 8 (NeMo's 32/8 is 4), an odd 5 (padded rows in the dot) and 12.
CASES = {
    "d64_g4_bs16": (64, 2, 4, 16, [1, 15, 16, 17, 2500]),
    "d128_g8_bs64": (128, 1, 8, 64, [64, 1, 63, 65, 700]),
    "d64_g1_bs64": (64, 3, 1, 64, [65, 1, 130]),
    "d128_g5_bs32": (128, 2, 5, 32, [31, 33, 1, 96]),
    "d128_nemo_bs256": (128, 8, 4, 256, [1, 255, 256, 257]),
    "d128_g12_bs16": (128, 1, 12, 16, [1, 17, 70]),  # Pixtral-Large's Mistral-Large-2: 96 / 8 heads
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(case, dtype, device):
    q, k_cache, v_cache, table, lens = make_case(*CASES[case], dtype, device)
    out = ops.gqa_decode_attention(q, k_cache, v_cache, table, lens)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, oracle(q, k_cache, v_cache, table, lens), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_num_splits_agree(dtype, device):
    """One split (the kernel writes out itself) and several (partials + merge), including more
    splits than a short sequence has tiles (neutral partials), give the same answer."""
    q, k_cache, v_cache, table, lens = make_case(64, 2, 4, 16, [1, 16, 17, 300], dtype, device, seed=1,
                                                 garbage=2**30)
    scale = 0.11
    expected = oracle(q, k_cache, v_cache, table, lens, scale)
    outs = {n: kernel.gqa_decode_attention(q, k_cache, v_cache, table, lens, scale, num_splits=n)
            for n in (1, 3, kernel.MAX_SPLITS)}
    for n, out in outs.items():
        assert_close(out, expected, dtype, msg=f"num_splits={n}")
    if dtype == torch.float32:  # same tiles, only the merge order differs
        for n in (3, kernel.MAX_SPLITS):
            torch.testing.assert_close(outs[n], outs[1], atol=1e-6, rtol=1e-6)


def test_num_splits_out_of_range_raises(device):
    q, k_cache, v_cache, table, lens = make_case(64, 1, 4, 16, [5], torch.float32, device)
    with pytest.raises(ValueError, match="num_splits"):
        kernel.gqa_decode_attention(q, k_cache, v_cache, table, lens, 0.125, num_splits=kernel.MAX_SPLITS + 1)


def test_choose_num_splits():
    # NeMo at batch 1 on an H200: 8 programs alone would leave 124 of 132 SMs idle.
    assert kernel.choose_num_splits(1, 8, 8192, 64, 132) == kernel.MAX_SPLITS
    assert kernel.choose_num_splits(4, 8, 8192, 64, 132) == 9
    assert kernel.choose_num_splits(256, 8, 8192, 64, 132) == 1
    # Never more splits than the context bound has tiles.
    assert kernel.choose_num_splits(1, 8, 100, 64, 132) == 2


def test_opcheck(device):
    q, k_cache, v_cache, table, lens = make_case(64, 1, 4, 16, [3, 20], torch.float32, device)
    torch.library.opcheck(torch.ops.pixtral_fast.gqa_decode_attention.default,
                          (q, k_cache, v_cache, table, lens, 0.125))


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp16 compiles as bf16 does
def test_triton_twin_on_gpu(case, dtype, num_splits):
    q, k_cache, v_cache, table, lens = make_case(*CASES[case], dtype, "cuda")
    scale = q.shape[-1] ** -0.5
    out = kernel.gqa_decode_attention(q, k_cache, v_cache, table, lens, scale, num_splits=num_splits)
    assert_close(out, oracle(q, k_cache, v_cache, table, lens), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_twin_wide_table_on_gpu(dtype):
    """A table sized for a long context (so many splits) holding short sequences."""
    q, k_cache, v_cache, table, lens = make_case(128, 8, 4, 16, [1, 17, 40], dtype, "cuda")
    wide = torch.full((3, 1024), -1, dtype=torch.int32, device="cuda")
    wide[:, :table.shape[1]] = table
    out = kernel.gqa_decode_attention(q, k_cache, v_cache, wide, lens, 128 ** -0.5)
    assert_close(out, oracle(q, k_cache, v_cache, wide, lens), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_replay_with_new_tables(dtype):
    check_graph_replay(ops.gqa_decode_attention, dtype, [[1, 17, 300, 2000], [2000, 5, 16, 999]])
