"""The tensor-parallel shard plan and per-rank loading, in one process: every rank's cut of every
tensor, read from the consolidated and the HF formats, against the whole tensor cut by hand."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from pixtral_fast.config import ModelArgs
from pixtral_fast.model.pixtral import build_model
from pixtral_fast.parallel import Collectives, ShardPlan
from pixtral_fast.parallel.plan import check_size
from pixtral_fast.tiny import TINY_LARGE_ARGS, make_tiny
from pixtral_fast.weights import (apply_hf_rope_permutation, load_state_dict,
                                  undo_hf_rope_permutation)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "2", None])
def test_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        check_size(bad)
    assert check_size(3) == 3


def test_plan_refuses_a_decoder_it_cannot_split():
    text = TINY_LARGE_ARGS.text  # 12 heads, 1 KV head, FFN 192
    with pytest.raises(ValueError, match=r"n_heads 12 is not divisible.*hidden_dim 192 is not divisible"):
        ShardPlan(5).check(text)
    with pytest.raises(ValueError, match="n_kv_heads 2 neither divides by it nor divides it"):
        ShardPlan(3).check(replace(text, n_kv_heads=2, n_heads=12))
    with pytest.raises(ValueError, match=r"rank 4 is not in \[0, 4\)"):
        ShardPlan(4, 4)


@settings(max_examples=60, deadline=None)
@given(group=st.sampled_from([1, 2, 3, 4, 6, 12]), kv=st.sampled_from([1, 2, 4, 8]),
       size=st.sampled_from([1, 2, 4, 8, 16]))
def test_each_rank_holds_the_kv_heads_its_query_heads_read(group, kv, size):
    """GQA: global query head q reads KV head q // group. A rank's local query head j must read
    its local KV head j // (local group): true whether KV heads are split or replicated."""
    text = replace(TINY_LARGE_ARGS.text, n_heads=group * kv, n_kv_heads=kv, hidden_dim=16 * size)
    if (group * kv) % size:
        return
    covered = set()
    for rank in range(size):
        plan = ShardPlan(size, rank)
        local = plan.local_text_args(text)
        q0, nq = plan.query_heads(text)
        k0, nk = plan.kv_heads(text)
        assert (nq, nk) == (local.n_heads, local.n_kv_heads)
        local_group = nq // nk
        for j in range(nq):
            assert (q0 + j) // group == k0 + j // local_group
        covered |= set(range(q0, q0 + nq))
    assert covered == set(range(group * kv))


@pytest.mark.parametrize("vocab, size", [(32768, 3), (131072, 4), (10, 4), (7, 8)])
def test_vocab_shares_cover_the_vocabulary_once(vocab, size):
    rows = []
    for rank in range(size):
        start, n = ShardPlan(size, rank).vocab(vocab)
        assert 0 <= n <= ShardPlan(size, rank).vocab_rows_per_rank(vocab)
        rows += list(range(start, start + n))
    assert rows == list(range(vocab))


# Pixtral-Large in small with 2 KV heads (GQA group 6): at TP=2 each rank holds one KV head, at
# TP=4 and TP=6 the KV heads are replicated, ranks 0..size/2-1 holding head 0 and the rest head 1.
TWO_KV_ARGS = replace(TINY_LARGE_ARGS, text=replace(TINY_LARGE_ARGS.text, n_kv_heads=2))
SPLIT_ROWS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
              "feed_forward.w3.weight")
SPLIT_COLUMNS = ("attention.wo.weight", "feed_forward.w2.weight")


def kv_heads_read(text, size: int, rank: int) -> list[int]:
    """The KV heads that rank's query heads read: GQA's query head q reads KV head
    q // (n_heads / n_kv_heads), and a rank holds query heads [rank, rank + 1) x n_heads / size."""
    group, per = text.n_heads // text.n_kv_heads, text.n_heads // size
    return sorted({q // group for q in range(rank * per, (rank + 1) * per)})


def expected_cut(name: str, full: torch.Tensor, text, size: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of the whole tensor `name`, worked out from the head counts and sizes
    alone (Megatron: q/k/v/w1/w3 by output rows, wo/w2 by input columns, the vocabulary by rows
    padded with zeros to ceil(vocab / size); the rest whole)."""
    hd = text.head_dim
    if name in ("tok_embeddings.weight", "output.weight"):
        per = -(-text.vocab_size // size)
        rows = full[rank * per:(rank + 1) * per]  # the last share may be short, or empty
        return torch.cat([rows, rows.new_zeros(per - rows.shape[0], full.shape[1])])
    if not name.startswith("layers.") or not name.endswith(SPLIT_ROWS + SPLIT_COLUMNS):
        return full
    if name.endswith(("attention.wk.weight", "attention.wv.weight")):
        return torch.cat([full[h * hd:(h + 1) * hd] for h in kv_heads_read(text, size, rank)])
    width = (text.n_heads * hd if name.endswith(("attention.wq.weight", "attention.wo.weight"))
             else text.hidden_dim) // size
    cut = slice(rank * width, (rank + 1) * width)
    return full[cut] if name.endswith(SPLIT_ROWS) else full[:, cut]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny Pixtral-Large-shaped checkpoint with 2 KV heads (vocab 32768) in both formats; the
    HF copy is sharded over two files with an index."""
    from pixtral_fast.hf_export import convert_consolidated_to_hf

    root = tmp_path_factory.mktemp("tp_plan")
    consolidated = make_tiny(root / "consolidated", args=TWO_KV_ARGS)
    hf = convert_consolidated_to_hf(consolidated, root / "hf", dtype=torch.float32)
    whole = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    names = sorted(whole)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: whole[k] for k in keys}, str(hf / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    return consolidated, hf


def test_the_expected_cuts_cover_split_and_replicated_kv_heads():
    text = TWO_KV_ARGS.text
    assert [kv_heads_read(text, 2, r) for r in range(2)] == [[0], [1]]
    assert [kv_heads_read(text, 4, r) for r in range(4)] == [[0], [0], [1], [1]]
    assert [kv_heads_read(text, 6, r) for r in range(6)] == [[0], [0], [0], [1], [1], [1]]
    assert [kv_heads_read(replace(text, n_kv_heads=4), 2, r) for r in range(2)] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("fmt", ["consolidated", "hf"])
@pytest.mark.parametrize("size", [2, 4, 6])  # KV heads split; replicated; replicated, vocabulary not divisible
def test_each_rank_reads_exactly_its_cut(folders, fmt, size):
    folder = folders[0] if fmt == "consolidated" else folders[1]
    if fmt == "hf":
        assert (folder / "model.safetensors.index.json").is_file(), "the HF copy must be sharded"
    args = ModelArgs.from_params_json(folders[0] / "params.json")
    assert args.text.n_kv_heads == 2
    full = load_state_dict(folder, args, "cpu", torch.float32, progress=False)
    split = set()
    for rank in range(size):
        plan = ShardPlan(size, rank)
        part = load_state_dict(folder, args, "cpu", torch.float32, progress=False, shard=plan)
        expected_shapes = {k: tuple(v.shape) for k, v in
                           build_model(args, "meta", torch.float32, comm=Collectives(plan)).state_dict().items()}
        assert {k: tuple(v.shape) for k, v in part.items()} == expected_shapes
        for name, tensor in part.items():
            want = expected_cut(name, full[name], args.text, size, rank)
            if want is not full[name]:
                split.add(name.split(".", 2)[-1] if name.startswith("layers.") else name)
            torch.testing.assert_close(tensor, want, rtol=0, atol=0, msg=f"rank {rank}: {name}")
    assert split == {"tok_embeddings.weight", "output.weight", *SPLIT_ROWS, *SPLIT_COLUMNS}


def test_hf_rope_rows_are_unpermuted_per_rank_head():
    """HF stores wq/wk rows per head in rotate-half order: un-permuting a rank's head slice must
    equal slicing the un-permuted whole (the permutation never crosses heads)."""
    torch.manual_seed(0)
    heads, hd, cols = 8, 16, 5
    w = torch.randn(heads * hd, cols)
    hf = apply_hf_rope_permutation(w, heads)
    for size in (2, 4, 8):
        per = heads // size
        for rank in range(size):
            rows = slice(rank * per * hd, (rank + 1) * per * hd)
            assert torch.equal(undo_hf_rope_permutation(hf[rows], per), w[rows])


def test_a_plan_only_rank_cannot_run():
    args = TINY_LARGE_ARGS
    model = build_model(args, "cpu", torch.float32, comm=Collectives(ShardPlan(2, 1)))
    assert model.local_text.n_heads == args.text.n_heads // 2
    with pytest.raises(RuntimeError, match="rank 1's shard of a 2-way tensor-parallel model built without a process "
                                           "group"):
        model.tok_embeddings(torch.tensor([1, 2]))


def test_one_way_plan_builds_the_plain_model():
    args = TINY_LARGE_ARGS
    whole = build_model(args, "meta", torch.float32)
    one = build_model(args, "meta", torch.float32, comm=Collectives(ShardPlan(1, 0)))
    assert type(one.tok_embeddings) is type(whole.tok_embeddings) is torch.nn.Embedding
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in whole.state_dict().items()}


