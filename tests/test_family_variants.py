"""Every variant through the user's paths (issue 10): `make-tiny --variant`, loading, checkpoint
key/shape checks naming the family's own keys, consolidated -> HF export that transformers loads
(the inverse key map and q/k permutation), and the engine and CLI unchanged."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pixtral_fast as pf
from pixtral_fast.cli import main
from pixtral_fast.tiny import VARIANTS, make_tiny
from pixtral_fast.hf_export import consolidated_to_hf_name
from pixtral_fast.weights import CONSOLIDATED, CheckpointError, hf_to_consolidated_name

FAMILY_KEYS = {"mistral-small-3.1": ["patch_merger.merging_layer.weight", "pre_mm_projector_norm.weight"],
               "pixtral-large": []}


def test_variants_offered():
    assert set(VARIANTS) == {"pixtral-12b", "mistral-small-3.1", "pixtral-large"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_make_tiny_cli_writes_a_loadable_variant(tmp_path, variant, capsys):
    main(["make-tiny", str(tmp_path / variant), "--variant", variant, "--seed", "1"])
    assert str(tmp_path / variant) in capsys.readouterr().out
    model = pf.load_model(tmp_path / variant, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    keys = set(model.state_dict())
    assert all(k in keys for k in FAMILY_KEYS.get(variant, []))
    assert ("vision_language_adapter.w_in.bias" in keys) == (variant == "pixtral-12b")


def test_make_tiny_rejects_unknown_variant(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["make-tiny", str(tmp_path / "x"), "--variant", "pixtral-huge"])
    assert "pixtral-huge" in capsys.readouterr().err


def test_missing_merger_weight_is_named(tmp_path):
    folder = make_tiny(tmp_path / "small", seed=0, variant="mistral-small-3.1")
    state = load_file(str(folder / CONSOLIDATED))
    state.pop("patch_merger.merging_layer.weight")
    state["vision_language_adapter.w_in.bias"] = torch.zeros(state["vision_language_adapter.w_in.weight"].shape[0])
    save_file(state, str(folder / CONSOLIDATED))
    with pytest.raises(CheckpointError) as err:
        pf.load_model(folder, device="cpu", progress=False)
    assert "missing (1): patch_merger.merging_layer.weight" in str(err.value)
    assert "unexpected (1): vision_language_adapter.w_in.bias" in str(err.value)


@pytest.mark.parametrize("hf, ours", [
    ("multi_modal_projector.patch_merger.merging_layer.weight", "patch_merger.merging_layer.weight"),
    ("model.multi_modal_projector.patch_merger.merging_layer.weight", "patch_merger.merging_layer.weight"),
    ("multi_modal_projector.norm.weight", "pre_mm_projector_norm.weight"),
    ("model.multi_modal_projector.norm.weight", "pre_mm_projector_norm.weight"),
    ("model.language_model.norm.weight", "norm.weight"),
])
def test_family_hf_names(hf, ours):
    assert hf_to_consolidated_name(hf) == ours


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_key_maps_are_inverse(tmp_path, variant):
    folder = make_tiny(tmp_path / variant, seed=0, variant=variant)
    for name in load_file(str(folder / CONSOLIDATED)):
        assert hf_to_consolidated_name(consolidated_to_hf_name(name)) == name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_to_hf_loads_in_transformers_with_same_logits(tmp_path, variant):
    from transformers import AutoModelForImageTextToText

    from tests.support.hf_mistral3 import hf_logits

    folder = make_tiny(tmp_path / "ours", seed=0, variant=variant)
    main(["export-hf", str(folder), str(tmp_path / "hf"), "--dtype", "fp32"])
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    side = 28 if variant == "mistral-small-3.1" else 16
    images = [torch.randn(3, 2 * side, 3 * side, generator=torch.Generator().manual_seed(0))]
    v = ours.args.vision
    block = ([v.image_token_id] * 3 + [v.image_break_token_id]) * 2
    tokens = torch.tensor([1, 3] + block[:-1] + [v.image_end_token_id, 300, 301, 4])
    ours.check_request(tokens.tolist(), images)
    torch.testing.assert_close(ours(tokens, images), hf_logits(hf, tokens, images), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == (["Mistral3ForConditionalGeneration"] if variant == "mistral-small-3.1"
                                       else ["LlavaForConditionalGeneration"])


@pytest.mark.parametrize("variant", ["mistral-small-3.1", "pixtral-large"])
def test_bench_accepts_each_fixture_on_meta(variant):
    """`bench --params P --random-weights` builds every fixture; on the meta device this costs nothing
    and checks that the prompt it would time matches the model's own [IMG] layout."""
    from pixtral_fast import benchmark
    from tests.support.family_keys import VARIANT_DIRS

    args = pf.ModelArgs.from_params_json(VARIANT_DIRS[variant])
    model = pf.build_model(args, device="meta")
    prompt = benchmark.image_prompt(1024, args.vision)
    assert prompt.images[0].shape[1] <= args.vision.image_size
    model.check_request(prompt.tokens, [torch.zeros(prompt.images[0].shape)])


def test_cli_variants_are_tiny_variants():
    from pixtral_fast.cli import TINY_VARIANTS

    assert set(TINY_VARIANTS) == set(VARIANTS)
