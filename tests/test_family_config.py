"""The Pixtral family's configs (issue 10): each fixture params.json gives the tensor table written
by hand in tests/support/family_keys.py, its meta-device parameter count meets the published
total, the HF Mistral3 config reads to the same fields, and variants we do not run are refused
with a ConfigError naming the field."""
import json

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.config import ConfigError
from pixtral_fast.weights import expected_shapes
from tests.support.family_keys import PUBLISHED_BILLIONS, VARIANT_DIRS, count, key_table, read_params

EXACT_TOTALS = {"mistral-small-3.1": 24_011_361_280, "mistral-small-3.2": 24_011_361_280,
                "pixtral-large": 124_445_939_328}


@pytest.mark.parametrize("variant", VARIANT_DIRS)
def test_tensor_table_matches_hand_written(variant):
    args = pf.ModelArgs.from_params_json(VARIANT_DIRS[variant])
    assert expected_shapes(args) == key_table(read_params(variant))


@pytest.mark.parametrize("variant", VARIANT_DIRS)
def test_meta_parameter_count_meets_published_total(variant):
    model = pf.build_model(pf.ModelArgs.from_params_json(VARIANT_DIRS[variant]), device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert total == EXACT_TOTALS[variant] == count(key_table(read_params(variant)))
    # Model cards round to one decimal (24.0B) or to the billion (124B).
    assert round(total / 1e9, 0) == round(PUBLISHED_BILLIONS[variant], 0)


def test_small_31_fields():
    args = pf.ModelArgs.from_params_json(VARIANT_DIRS["mistral-small-3.1"])
    v, t = args.vision, args.text
    assert (v.patch_size, v.image_size, v.spatial_merge_size, v.mm_projector_id) == (14, 1540, 2, "patch_merge")
    assert v.add_pre_mm_projector_layer_norm and not v.adapter_bias
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 12, 13)
    assert (t.dim, t.hidden_dim, t.n_heads, t.n_kv_heads, t.rope_theta) == (5120, 32768, 32, 8, 1e9)


def test_pixtral_large_fields():
    args = pf.ModelArgs.from_params_json(VARIANT_DIRS["pixtral-large"])
    v, t = args.vision, args.text
    assert v.head_dim == 104 and v.spatial_merge_size == 1 and not v.adapter_bias
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 14, 15)  # v7m1's pieces
    assert not v.add_pre_mm_projector_layer_norm
    assert t.n_heads // t.n_kv_heads == 12 and (t.vocab_size, t.rope_theta) == (32768, 1e6)


@pytest.mark.parametrize("variant", VARIANT_DIRS)
def test_params_json_round_trip(variant, tmp_path):
    """What we write reads back to the same model, and says nothing the release's file does not:
    every key we write is in the fixture with the same value (we leave out the family's fields that
    are at Pixtral-12B's defaults, as Pixtral-12B's own file does)."""
    args = pf.ModelArgs.from_params_json(VARIANT_DIRS[variant])
    written, release = args.to_params_json(), read_params(variant)
    vision_written, vision_release = written.pop("vision_encoder"), release.pop("vision_encoder")
    assert written == release
    assert vision_written.items() <= vision_release.items()
    assert {"spatial_merge_size", "mm_projector_id", "adapter_bias"} & vision_release.keys() <= vision_written.keys()
    (tmp_path / "params.json").write_text(json.dumps(args.to_params_json()))
    assert pf.ModelArgs.from_params_json(tmp_path) == args


def hf_config_dir(tmp_path, variant):
    from tests.support.hf_mistral3 import BUILDERS

    BUILDERS[variant]().config.save_pretrained(tmp_path)
    return tmp_path


def test_hf_mistral3_config(tmp_path):
    args = pf.ModelArgs.from_hf_config(hf_config_dir(tmp_path, "mistral-small-3.1"))
    v, t = args.vision, args.text
    assert (v.patch_size, v.spatial_merge_size, v.mm_projector_id) == (14, 2, "patch_merge")
    assert v.add_pre_mm_projector_layer_norm and not v.adapter_bias  # HF's Mistral3 always has the norm
    assert (t.dim, t.head_dim, t.n_heads, t.n_kv_heads) == (96, 32, 6, 2)


def test_hf_pixtral_large_shaped_config(tmp_path):
    args = pf.ModelArgs.from_hf_config(hf_config_dir(tmp_path, "pixtral-large"))
    assert args.vision.head_dim == 24 and not args.vision.adapter_bias and args.vision.spatial_merge_size == 1
    assert args.text.rope_theta == 1e6


def write_variant(tmp_path, edit):
    raw = read_params("mistral-small-3.1")
    edit(raw["vision_encoder"])
    (tmp_path / "params.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda v: v.update(mm_projector_id="mlp_merge"), r"mm_projector_id 'mlp_merge'"),
    (lambda v: v.update(mm_projector_id=""), r"spatial_merge_size 2 .*mm_projector_id"),
    (lambda v: v.update(spatial_merge_size=0), r"spatial_merge_size"),
    (lambda v: v.update(spatial_merge_size=3), r"spatial_merge_size 3"),  # 1540/14 = 110 patches: 3 does not divide
    (lambda v: v.update(max_image_size=1024), r"max_image_size 1024 .*image_size 1540"),
    (lambda v: v.update(use_cls_token=True), r"unsupported field.*use_cls_token"),
    (lambda v: v.update(add_pre_mm_projector_layer_norm="yes"), r"add_pre_mm_projector_layer_norm"),
])
def test_unsupported_variant_is_refused(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        pf.ModelArgs.from_params_json(write_variant(tmp_path, edit))


def test_hf_unknown_projector_is_refused(tmp_path):
    folder = hf_config_dir(tmp_path, "mistral-small-3.1")
    raw = json.loads((folder / "config.json").read_text())
    raw["vision_feature_layer"] = [-1, -2]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        pf.ModelArgs.from_hf_config(folder)


def test_family_models_are_bf16_on_meta():
    for folder in VARIANT_DIRS.values():
        model = pf.build_model(pf.ModelArgs.from_params_json(folder), dtype=torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
