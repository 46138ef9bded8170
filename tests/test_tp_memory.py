"""The tensor-parallel memory plan and roofline (pixtral_fast/runtime/tp_memory.py) against numbers
computed here by hand from the config: per-rank bytes of the tiny model (with KV-head replication
and a vocabulary that does not split evenly), the sum over ranks, KV bytes per token, the tokens
that fit, the roofline formula; Pixtral-Large at TP=8 on H200s; and `pixtral-fast bench` with
--tensor-parallel-size: the plan alone for --random-weights (no model built), a real TP=2 decode
for --model DIR."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pixtral_fast import benchmark
from pixtral_fast.cli import main
from pixtral_fast.config import ModelArgs
from pixtral_fast.model.pixtral import build_model
from pixtral_fast.runtime import tp_memory as memory
from pixtral_fast.tiny import TINY_ARGS, make_tiny

LARGE = Path(__file__).parent / "fixtures" / "pixtral-large-2411" / "params.json"
VOCAB = 1001  # not divisible by 2 or 4: the vocabulary shards are padded
ARGS = replace(TINY_ARGS, text=replace(TINY_ARGS.text, vocab_size=VOCAB))
T = ARGS.text  # dim 64, 2 layers, 4 heads x 64, 2 KV heads, hidden 128


def text_params_by_hand(t, n: int) -> dict:
    """One rank's decoder parameters at n ranks: split ones and the norms."""
    hd, dim = t.head_dim, t.dim
    q_heads = t.n_heads // n
    kv_heads = t.n_kv_heads // n if n <= t.n_kv_heads else 1  # replicated when the ranks outnumber them
    hidden = t.hidden_dim // n
    per_layer = q_heads * hd * dim * 2 + kv_heads * hd * dim * 2 + hidden * dim * 3
    vocab_rows = -(-t.vocab_size // n)
    return {"split": t.n_layers * per_layer + 2 * vocab_rows * dim, "norms": (2 * t.n_layers + 1) * dim,
            "kv_heads": kv_heads}


def vision_params(args: ModelArgs) -> int:
    """Everything outside the decoder, from the whole model's state dict."""
    model = build_model(args, device="meta", dtype=torch.float32)
    return sum(v.numel() for k, v in model.state_dict().items()
               if not k.startswith(("layers.", "tok_embeddings.", "output.", "norm.")))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_each_rank_holds_its_split_plus_the_replicated_parts(n):
    elem = 4
    hand = text_params_by_hand(T, n)
    replicated = (vision_params(ARGS) + hand["norms"]) * elem
    ranks = [memory.rank_plan(ARGS, n, r, torch.float32) for r in range(n)]
    for plan in ranks:
        assert plan["split_bytes"] == hand["split"] * elem
        assert plan["replicated_bytes"] == replicated
        assert plan["weights_bytes"] == hand["split"] * elem + replicated
        assert plan["kv_heads"] == hand["kv_heads"]
        assert plan["kv_bytes_per_token"] == 2 * T.n_layers * hand["kv_heads"] * T.head_dim * elem
    # Summed over the ranks: the whole model, plus (n - 1) more copies of the replicated parts,
    # the replicated KV heads' wk/wv rows, and the vocabulary padding.
    whole = memory.rank_plan(ARGS, 1, 0, torch.float32)["weights_bytes"]
    extra_kv_heads = max(0, n - T.n_kv_heads)
    kv_copies = T.n_layers * 2 * extra_kv_heads * T.head_dim * T.dim * elem
    padding = 2 * (n * -(-VOCAB // n) - VOCAB) * T.dim * elem
    assert sum(p["weights_bytes"] for p in ranks) == whole + (n - 1) * replicated + kv_copies + padding


def test_the_kv_cache_gets_what_the_engine_would_give_it():
    rank = memory.rank_plan(ARGS, 2, 0, torch.float32)
    weights, per_token = rank["weights_bytes"], rank["kv_bytes_per_token"]
    useful = 3 * 100
    just_enough = weights + -(-useful * per_token * 10 // 9) + 16  # 0.9 of what is left holds 300 tokens
    plan = memory.memory_plan(ARGS, 2, torch.float32, memory_bytes=just_enough, max_batch_size=3, context=100)
    assert plan["kv_tokens_that_fit"] == int(0.9 * (just_enough - weights)) // per_token >= useful
    assert plan["fits"] and plan["weights_fit"] and plan["useful_kv_tokens"] == useful
    short = memory.memory_plan(ARGS, 2, torch.float32, memory_bytes=weights + useful * per_token, max_batch_size=3,
                               context=100)
    assert short["weights_fit"] and not short["fits"] and short["kv_tokens_that_fit"] < useful
    none = memory.memory_plan(ARGS, 2, torch.float32, memory_bytes=weights // 2)
    assert not none["weights_fit"] and not none["fits"] and none["kv_tokens_that_fit"] == 0


@pytest.mark.parametrize("n", [1, 2, 4])
def test_roofline_by_hand(n):
    batch, context, elem = 3, 10, 2
    rank = memory.rank_plan(ARGS, n, 0, torch.bfloat16)
    hand = text_params_by_hand(T, n)
    vocab_rows = -(-VOCAB // n)
    weights_read = (hand["split"] - vocab_rows * T.dim + hand["norms"]) * elem + batch * T.dim * elem
    kv = batch * context * 2 * T.n_layers * hand["kv_heads"] * T.head_dim * elem
    hbm_s = (weights_read + kv) / 4.8e12
    if n == 1:
        comm_s = 0.0
    else:
        comm_s = ((2 * T.n_layers + 1) * 2 * (n - 1) / n * batch * T.dim * elem
                  + (n - 1) / n * batch * n * vocab_rows * elem) / 450e9
    line = memory.decode_roofline(ARGS, rank, n, batch, context, torch.bfloat16)
    assert line["hbm_bytes_per_rank"] == weights_read + kv
    assert line["step_ms"] == pytest.approx(1e3 * (hbm_s + comm_s), rel=1e-12)
    assert line["roofline_tok_per_s"] == pytest.approx(batch / (hbm_s + comm_s), rel=1e-12)
    assert line["all_reduces"] == (0 if n == 1 else 2 * T.n_layers + 1)


def test_pixtral_large_fits_8_h200s_and_not_2():
    args = ModelArgs.from_params_json(LARGE)
    t = args.text
    total_params = 124_445_939_328  # tests/test_family_config.py's meta count
    whole = text_params_by_hand(t, 1)
    replicated = (total_params - whole["split"]) * 2  # the ViT, the adapter, the norms: bf16
    ranks = [memory.rank_plan(args, 8, r) for r in (0, 7)]
    for rank in ranks:
        assert rank["weights_bytes"] == whole["split"] * 2 // 8 + replicated  # 32768 rows and every width split evenly
        assert rank["kv_bytes_per_token"] == 2 * 88 * 1 * 128 * 2
    plan8 = memory.memory_plan(args, 8, memory_bytes=141 * 10**9, ranks=ranks)
    assert plan8["fits"] and plan8["kv_tokens_that_fit"] > 2_000_000 > plan8["useful_kv_tokens"] == 32 * 8192
    plan2 = memory.memory_plan(args, 2, memory_bytes=141 * 10**9)
    assert plan2["weights_fit"] and not plan2["fits"]  # 126 GB of weights leave ~73k tokens of KV
    assert not memory.memory_plan(args, 1, memory_bytes=141 * 10**9, ranks=[memory.rank_plan(args, 1, 0)])[
        "weights_fit"]


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(ARGS.to_params_json()))
    return path


def test_bench_random_weights_at_tp2_plans_without_building_a_model(params, monkeypatch, capsys):
    def no_weights(*args, **kwargs):
        raise AssertionError("bench made a model")

    monkeypatch.setattr(benchmark, "random_model", no_weights)
    main(["bench", "--params", str(params), "--random-weights", "--tensor-parallel-size", "2", "--batch", "1", "4",
          "--image-size", "64", "--dtype", "fp32", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    plan = report["memory_plan"]
    assert plan["weights_per_rank_bytes"] == memory.rank_plan(ARGS, 2, 0, torch.float32)["weights_bytes"]
    assert plan["useful_kv_tokens"] == 4 * memory.USEFUL_CONTEXT and plan["fits"] is True
    assert [line["batch"] for line in report["roofline"]] == [1, 4]
    assert report["decode_context"] == 2 + 4 * 5 + 16 + 1  # one 64x64 image prompt
    assert "needs a real checkpoint: pixtral-fast bench --model DIR --tensor-parallel-size 2" in report["note"]
    if not torch.cuda.is_available():
        assert "assumed to be an H200" in report["note"] and plan["gpu_memory_bytes"] == 141 * 10**9


@pytest.mark.parametrize("flags,phrase", [
    (["--params", "P", "--random-weights", "--scheme", "fp8"], "quantized weights are not split"),
    (["--params", "P"], "add --random-weights"),
    (["--model", "DIR", "--random-weights"], "drop --random-weights"),
])
def test_bench_refuses_what_tp_cannot_time(flags, phrase, params, capsys):
    flags = [str(params) if f == "P" else str(params.parent) if f == "DIR" else f for f in flags]
    with pytest.raises(SystemExit) as e:
        main(["bench", *flags, "--tensor-parallel-size", "2", "--image-size", "64", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and phrase in err


def test_bench_model_at_tp2_times_the_checkpoint_against_the_tp_roofline(tmp_path):
    tiny = make_tiny(tmp_path / "tiny", seed=0)
    report = benchmark.run_checkpoint(tiny, batches=[1, 2], image_size=64, decode_steps=2, device="cpu",
                                      dtype=torch.float32, backend="reference", reps=1, tensor_parallel_size=2)
    assert report["engine"].startswith("tensor parallel 2 (gloo)")
    rank = memory.rank_plan(TINY_ARGS, 2, 0, torch.float32)
    assert report["weights_per_rank_GB"] == [rank["weights_bytes"] / 1e9] * 2
    for line in report["decode"]:
        assert line["tok_per_s"] > 0 and line["stopped_early"] == 0
        ideal = memory.decode_roofline(TINY_ARGS, rank, 2, line["batch"], line["context"], torch.float32)
        assert line["roofline_tok_per_s"] == pytest.approx(ideal["roofline_tok_per_s"], rel=1e-12)
