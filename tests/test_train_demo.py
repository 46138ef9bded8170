"""`pixtral-fast train-demo`: deterministic, writes a checkpoint that loads as it is, and its
training-time ops are the reference's."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pixtral_fast import easy_vqa, reference
from pixtral_fast.cli import main
from pixtral_fast.model.load import checkpoint_path, load_model, read_args
from pixtral_fast.tokenizer import Tokenizer
from pixtral_fast.train_demo import DEMO_ARGS, SHIPPED_DIR, batched_attention


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    for out in outs:
        main(["train-demo", "--out", str(out), "--max-steps", "2", "--quiet"])
    return outs


def test_training_is_deterministic(two_runs):
    a, b = (load_file(str(out / "consolidated.safetensors")) for out in two_runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_loads_with_its_tokenizer(two_runs):
    out = two_runs[0]
    model = load_model(out, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    assert model.args == DEMO_ARGS
    tokenizer = Tokenizer.for_checkpoint(out)
    tokenizer.check_matches(model.args.vision)
    record = json.loads((out / "training.json").read_text())
    assert record["epochs"][-1]["steps"] == 2
    # Only the rows the data uses are trained; the others are zero (git stores them in nothing).
    used = model.tok_embeddings.weight.abs().sum(1) > 0
    q = easy_vqa.questions("test")[0]
    prompt = tokenizer.encode(easy_vqa.messages(q)).tokens
    assert used[prompt].all() and 0 < int(used.sum()) < 1000


def test_the_shipped_model_is_the_demo_architecture():
    assert read_args(checkpoint_path(SHIPPED_DIR)) == DEMO_ARGS
    assert (SHIPPED_DIR / "tekken.json").is_file() and (SHIPPED_DIR / "training.json").is_file()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_batched_attention_is_the_reference(causal, rope):
    """Equal lengths take the batched path; mixed lengths the reference's own loop."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 4, 2, 32
    for lengths in ([5, 5, 5], [3, 6]):
        total = sum(lengths)
        q, k, v = (torch.randn(total, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        pos = torch.randint(0, 4, (total, 2), generator=g, dtype=torch.int32) if rope else None
        got = batched_attention(q, k, v, cu, max(lengths), causal=causal, pos=pos)
        want = reference.varlen_attention(q, k, v, cu, max(lengths), causal=causal, pos=pos)
        torch.testing.assert_close(got, want)  # fp64 both: torch's fp64 defaults
