"""quantize_checkpoint (`pixtral-fast quantize`): its output is a compressed-tensors folder that
transformers + compressed-tensors read back with the same logits as pixtral_fast on it, its error
against the dense model is no worse than compressed-tensors' own round-to-nearest on the same model,
and bad requests are refused naming the argument."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pixtral_fast.model.load import load_quantized_model
from pixtral_fast.quantize_checkpoint import quantize_checkpoint
from pixtral_fast.weights import CheckpointError
from tests.support.ct_quant import save_ct_quantized
from tests.support.hf_peer import hf_logits, image_tokens, save_tiny_hf, tiny_hf_model

ATOL = 2e-3
TOKENS = torch.tensor([1, 3] + image_tokens(3, 5) + [300, 301, 302, 4])
IMAGES = [torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(1))]
CT_NAME = {"w4a16": "W4A16", "fp8": "FP8_WEIGHT_ONLY"}


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    folder = save_tiny_hf(tmp_path_factory.mktemp("dense"), seed=0)
    (folder / "tekken.json").write_text("{}")  # stands for the tokenizer files that must be copied
    return folder


@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_quantized_folder_round_trips(dense_folder, tmp_path, scheme):
    from transformers import LlavaForConditionalGeneration

    dst = quantize_checkpoint(dense_folder, tmp_path / "q", scheme, group_size=32, progress=False,
                              shard_bytes=64 << 10)  # several shards, with an index
    assert (dst / "tekken.json").is_file() and (dst / "model.safetensors.index.json").is_file()
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    hf = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    ours = load_quantized_model(dst, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    expected = hf_logits(hf, TOKENS, IMAGES)
    actual = ours(TOKENS, IMAGES)
    assert (actual - expected).abs().max().item() <= ATOL

    dense = hf_logits(tiny_hf_model(seed=0), TOKENS, IMAGES)
    ct_folder = save_ct_quantized(tmp_path / "ct", CT_NAME[scheme], group_size=32)
    ct = LlavaForConditionalGeneration.from_pretrained(ct_folder, dtype=torch.float32).eval()
    ours_err = (expected - dense).abs().mean().item()
    ct_err = (hf_logits(ct, TOKENS, IMAGES) - dense).abs().mean().item()
    assert ours_err > 0 and ours_err <= ct_err * 1.01, (ours_err, ct_err)


def test_only_decoder_linears_are_quantized(dense_folder, tmp_path):
    dst = quantize_checkpoint(dense_folder, tmp_path / "q", "w4a16", group_size=32, progress=False)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
    assert "language_model.model.layers.0.mlp.down_proj.weight_packed" in keys
    assert "language_model.lm_head.weight" in keys and "language_model.model.embed_tokens.weight" in keys
    assert not any(k.startswith(("vision_tower", "multi_modal_projector")) and "packed" in k for k in keys)
    vision = quantize_checkpoint(dense_folder, tmp_path / "v", "w4a16", group_size=32, include_vision=True,
                                 progress=False)
    with safe_open(str(vision / "model.safetensors"), framework="pt") as st:
        assert "vision_tower.transformer.layers.0.attention.q_proj.weight_packed" in set(st.keys())


@pytest.mark.parametrize("kwargs,error,message", [
    ({"scheme": "int8"}, ValueError, r"scheme must be one of"),
    ({"scheme": "w4a16", "group_size": 12}, ValueError, r"group_size must be a positive multiple of 8"),
    ({"scheme": "w4a16", "group_size": 64}, CheckpointError, r"down_proj.weight \(96, 160\): --group-size 64 does not "
                                                              r"divide its 160 inputs"),
])
def test_refusals(dense_folder, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        quantize_checkpoint(dense_folder, tmp_path / "q", progress=False, **kwargs)
    assert not (tmp_path / "q").exists(), "a failed run leaves no half-written folder"


def test_refuses_a_non_empty_destination(dense_folder, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "x").write_text("")
    with pytest.raises(ValueError, match=r"dst .* exists and is not empty"):
        quantize_checkpoint(dense_folder, tmp_path / "q", "fp8", progress=False)


def test_command_registration(dense_folder, tmp_path, capsys):
    """The `quantize` subcommand as pixtral_fast.cli registers it (add_quantize_command)."""
    import argparse

    from pixtral_fast.quantize_command import add_quantize_command

    p = argparse.ArgumentParser(prog="pixtral-fast")
    add_quantize_command(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["quantize", str(dense_folder), str(tmp_path / "q"), "--scheme", "fp8"])
    a.func(a)
    assert capsys.readouterr().out.strip() == str(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    for bad in (["--scheme", "int3"], ["--scheme", "w4a16", "--group-size", "12"],
                ["--scheme", "w4a16", "--group-size", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(["quantize", "a", "b", *bad])
    assert "--group-size: must be a positive multiple of 8" in capsys.readouterr().err


def test_a_consolidated_checkpoint_keeps_its_tokenizer(tmp_path):
    """A merging model's tekken.json carries its own image section (patch, merge): losing it would
    make the quantized folder fall back to Pixtral-12B's tokenizer and refuse to load."""
    from pixtral_fast.tiny import make_tiny
    from pixtral_fast.tokenizer import Tokenizer

    src = make_tiny(tmp_path / "src", variant="mistral-small-3.1")
    dst = quantize_checkpoint(src, tmp_path / "q", "fp8", progress=False)
    assert (dst / "tekken.json").read_bytes() == (src / "tekken.json").read_bytes()
    model = load_quantized_model(dst, device="cpu", dtype=torch.float32)
    Tokenizer.for_checkpoint(dst).check_matches(model.args.vision)
