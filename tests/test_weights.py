"""Checkpoint loading: every way a checkpoint can be wrong fails with an error naming the problem."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pixtral_fast as pf
from pixtral_fast.config import ConfigError
from pixtral_fast.tiny import TINY_ARGS, VARIANTS, make_tiny, random_state_dict
from pixtral_fast.weights import (CONSOLIDATED, CheckpointError, apply_hf_rope_permutation, expected_shapes,
                                  hf_to_consolidated_name, undo_hf_rope_permutation)
from tests.support.family_keys import FIXTURES


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def rewrite(src, dst, edit):
    dst.mkdir(exist_ok=True)
    state = load_file(str(src / CONSOLIDATED))
    edit(state)
    save_file(state, str(dst / CONSOLIDATED))
    (dst / "params.json").write_text((src / "params.json").read_text())
    return dst


def test_tiny_checkpoint_loads_and_matches_seed(tiny_dir):
    model = pf.load_model(tiny_dir, device="cpu", dtype=torch.float32, progress=False)
    expected = random_state_dict(TINY_ARGS, seed=0)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, expected[name].bfloat16().float(), atol=0, rtol=0, msg=name)
    assert {p.dtype for p in pf.load_model(tiny_dir, device="cpu", progress=False).parameters()} == {torch.bfloat16}


def test_make_tiny_is_deterministic(tmp_path, tiny_dir):
    again = make_tiny(tmp_path / "again", seed=0)
    assert (again / CONSOLIDATED).read_bytes() == (tiny_dir / CONSOLIDATED).read_bytes()
    other = load_file(str(make_tiny(tmp_path / "other", seed=1) / CONSOLIDATED))
    assert not torch.equal(other["output.weight"], load_file(str(tiny_dir / CONSOLIDATED))["output.weight"])


def test_missing_key(tiny_dir, tmp_path):
    bad = rewrite(tiny_dir, tmp_path / "bad", lambda s: s.pop("layers.1.feed_forward.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): layers\.1\.feed_forward\.w2\.weight"):
        pf.load_model(bad, device="cpu", progress=False)


def test_unexpected_key(tiny_dir, tmp_path):
    bad = rewrite(tiny_dir, tmp_path / "bad", lambda s: s.update({"layers.9.attention.wq.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): layers\.9\.attention\.wq\.weight"):
        pf.load_model(bad, device="cpu", progress=False)


def test_wrong_shape(tiny_dir, tmp_path):
    def edit(s):
        s["norm.weight"] = torch.ones(65, dtype=torch.bfloat16)

    bad = rewrite(tiny_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"wrong shape \(1\): norm\.weight: file \(65,\) vs model \(64,\)"):
        pf.load_model(bad, device="cpu", progress=False)


def test_all_problems_in_one_error(tiny_dir, tmp_path):
    def edit(s):
        s.pop("output.weight")
        s["extra.weight"] = torch.zeros(1)
        s["norm.weight"] = torch.ones(3)

    bad = rewrite(tiny_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        pf.load_model(bad, device="cpu", progress=False)
    assert all(s in str(err.value) for s in ("output.weight", "extra.weight", "norm.weight"))


def test_truncated_file(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (tiny_dir / CONSOLIDATED).read_bytes()
    (bad / CONSOLIDATED).write_bytes(data[: len(data) // 3])
    (bad / "params.json").write_text((tiny_dir / "params.json").read_text())
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pf.load_model(bad, device="cpu", progress=False)


def test_params_json_missing_field(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads((tiny_dir / "params.json").read_text())
    del raw["head_dim"]
    (bad / "params.json").write_text(json.dumps(raw))
    (bad / CONSOLIDATED).symlink_to(tiny_dir / CONSOLIDATED)
    with pytest.raises(ConfigError, match="missing field.*head_dim"):
        pf.load_model(bad, device="cpu", progress=False)


def test_no_config_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        pf.load_model(tmp_path, device="cpu", progress=False)


def test_hf_rope_permutation_round_trip_and_layout():
    w = torch.arange(8 * 2 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads x 8 rows
    assert torch.equal(undo_hf_rope_permutation(apply_hf_rope_permutation(w, 2), 2), w)
    # rotate-half puts a head's first halves (pair members 0) before its second halves
    hf = apply_hf_rope_permutation(w, 2)
    assert torch.equal(hf[:4], w[0:8:2]) and torch.equal(hf[4:8], w[1:8:2])


@pytest.mark.parametrize("hf, ours", [
    ("language_model.model.layers.3.self_attn.k_proj.weight", "layers.3.attention.wk.weight"),
    ("model.language_model.layers.3.mlp.gate_proj.weight", "layers.3.feed_forward.w1.weight"),
    ("language_model.lm_head.weight", "output.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.vision_tower.transformer.layers.0.feed_forward.down_proj.weight",
     "vision_encoder.transformer.layers.0.feed_forward.w2.weight"),
    ("vision_tower.transformer.layers.5.attention.o_proj.weight", "vision_encoder.transformer.layers.5.attention.wo.weight"),
    ("multi_modal_projector.linear_2.bias", "vision_language_adapter.w_out.bias"),
    ("language_model.model.layers.0.post_attention_layernorm.weight", "layers.0.ffn_norm.weight"),
])
def test_hf_names(hf, ours):
    assert hf_to_consolidated_name(hf) == ours


def _text_only(args):
    return pf.ModelArgs(text=args.text, vision=None)


@pytest.mark.parametrize("args", [
    pytest.param(args, id=name) for name, args in [
        *VARIANTS.items(), ("text-only", _text_only(TINY_ARGS)),
        ("no-adapter-bias", pf.ModelArgs(text=TINY_ARGS.text,
                                         vision=dataclasses.replace(TINY_ARGS.vision, adapter_bias=False))),
        *((f"fixture-{d.name}", pf.ModelArgs.from_params_json(d)) for d in sorted(FIXTURES.iterdir()))]])
def test_the_config_tensor_table_is_the_model_state_dict(args):
    """The loaders check a checkpoint against config_tensors' table (no model built); the model's
    own state dict, on the meta device, must be that table exactly: names and shapes."""
    model = pf.build_model(args, device="meta")
    assert expected_shapes(args) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
