"""The real params.json -> the exact Pixtral-12B-2409 tensor table (DESIGN §1), on the meta device."""
import json
from pathlib import Path

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.config import ConfigError
from pixtral_fast.weights import expected_shapes

PARAMS = Path(__file__).parent / "data" / "params.json"


def design_key_table() -> dict[str, tuple[int, ...]]:
    """Written out from DESIGN §1 by hand, independently of the model code."""
    t = {"tok_embeddings.weight": (131072, 5120), "norm.weight": (5120,), "output.weight": (131072, 5120)}
    for i in range(40):
        p = f"layers.{i}."
        t.update({p + "attention.wq.weight": (4096, 5120), p + "attention.wk.weight": (1024, 5120),
                  p + "attention.wv.weight": (1024, 5120), p + "attention.wo.weight": (5120, 4096),
                  p + "feed_forward.w1.weight": (14336, 5120), p + "feed_forward.w3.weight": (14336, 5120),
                  p + "feed_forward.w2.weight": (5120, 14336),
                  p + "attention_norm.weight": (5120,), p + "ffn_norm.weight": (5120,)})
    v = "vision_encoder."
    t.update({v + "patch_conv.weight": (1024, 3, 16, 16), v + "ln_pre.weight": (1024,)})
    for j in range(24):
        p = f"{v}transformer.layers.{j}."
        t.update({p + f"attention.w{x}.weight": (1024, 1024) for x in "qkvo"})
        t.update({p + "feed_forward.w1.weight": (4096, 1024), p + "feed_forward.w3.weight": (4096, 1024),
                  p + "feed_forward.w2.weight": (1024, 4096),
                  p + "attention_norm.weight": (1024,), p + "ffn_norm.weight": (1024,)})
    a = "vision_language_adapter."
    t.update({a + "w_in.weight": (5120, 1024), a + "w_in.bias": (5120,),
              a + "w_out.weight": (5120, 5120), a + "w_out.bias": (5120,)})
    return t


def test_meta_model_has_exact_parameter_count():
    args = pf.ModelArgs.from_params_json(PARAMS)
    model = pf.build_model(args, device="meta")
    assert all(p.is_meta for p in model.parameters())

    def count(prefixes):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))

    assert sum(p.numel() for p in model.parameters()) == 12_682_739_712
    assert count("vision_encoder.") == 403_489_792
    assert count("vision_language_adapter.") == 31_467_520
    assert count(("tok_embeddings", "layers.", "norm.", "output.")) == 12_247_782_400


def test_every_tensor_name_and_shape_matches_design_table():
    assert expected_shapes(pf.ModelArgs.from_params_json(PARAMS)) == design_key_table()


def test_params_fields():
    args = pf.ModelArgs.from_params_json(PARAMS.parent)  # a folder works too
    assert (args.text.dim, args.text.n_heads, args.text.n_kv_heads, args.text.head_dim) == (5120, 32, 8, 128)
    assert args.text.rope_theta == 1e9 and args.vision.rope_theta == 1e4
    assert (args.vision.head_dim, args.vision.max_patches_per_side) == (64, 64)


@pytest.mark.parametrize("field", ["dim", "n_kv_heads", "vocab_size"])
def test_missing_field_is_named(tmp_path, field):
    raw = json.loads(PARAMS.read_text())
    del raw[field]
    (tmp_path / "params.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"missing field.*{field}"):
        pf.ModelArgs.from_params_json(tmp_path)


def test_missing_vision_field_is_named(tmp_path):
    raw = json.loads(PARAMS.read_text())
    del raw["vision_encoder"]["patch_size"]
    (tmp_path / "params.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="vision_encoder.*patch_size"):
        pf.ModelArgs.from_params_json(tmp_path)


def test_unknown_field_is_refused(tmp_path):
    raw = json.loads(PARAMS.read_text()) | {"sliding_window": 4096}
    (tmp_path / "params.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="sliding_window"):
        pf.ModelArgs.from_params_json(tmp_path)


def test_params_json_round_trip():
    args = pf.ModelArgs.from_params_json(PARAMS)
    assert args.to_params_json() == json.loads(PARAMS.read_text())


def test_hf_config_matches_params_json(tmp_path):
    from tests.support.hf_peer import tiny_hf_model

    tiny_hf_model().config.save_pretrained(tmp_path)
    args = pf.ModelArgs.from_hf_config(tmp_path)
    assert (args.text.dim, args.text.head_dim, args.text.n_kv_heads, args.text.rope_theta) == (96, 64, 2, 1e9)
    assert (args.vision.hidden_size, args.vision.num_attention_heads, args.vision.rope_theta) == (128, 2, 1e4)


def test_bf16_model_is_bf16_on_meta():
    model = pf.build_model(pf.ModelArgs.from_params_json(PARAMS), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
