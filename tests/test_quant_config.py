"""compressed-tensors quantization_config parsing: what compressed-tensors itself writes is read,
targets / ignore are matched as it matches them, and what we cannot run is refused naming the field."""
from __future__ import annotations

import copy
import json

import pytest
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

from pixtral_fast.quant import ACT_FP8_DYNAMIC_TOKEN, ACT_NONE, QuantConfig, QuantConfigError

W4A16 = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"],
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group",
                    "dynamic": False, "actorder": None},
    }},
    "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}, "version": "0.20.1",
}
FP8_DYNAMIC = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                              "dynamic": True},
    }},
}


def _ct_written(preset: str, **weights) -> dict:
    """The quantization_config compressed-tensors writes for a preset (as update_config does)."""
    cfg = QuantizationConfig(config_groups={preset: ["Linear"]}, ignore=["lm_head"])
    for key, value in weights.items():
        setattr(cfg.config_groups[preset].weights, key, value)
    cfg.quantization_status = QuantizationStatus.COMPRESSED
    cfg.format = "pack-quantized" if preset == "W4A16" else "float-quantized"
    return json.loads(json.dumps(cfg.model_dump(), default=str))


def test_reads_what_compressed_tensors_writes():
    w4 = QuantConfig.from_dict(_ct_written("W4A16", group_size=32))
    scheme = w4.scheme_for("model.language_model.layers.0.mlp.up_proj")
    assert (scheme.kind, scheme.strategy, scheme.group_size, scheme.activation) == ("w4a16", "group", 32, ACT_NONE)
    fp8 = QuantConfig.from_dict({"quantization_config": _ct_written("FP8_DYNAMIC")})  # a whole config.json
    scheme = fp8.scheme_for("model.language_model.layers.3.self_attn.q_proj")
    assert (scheme.kind, scheme.strategy, scheme.activation) == ("fp8", "channel", ACT_FP8_DYNAMIC_TOKEN)
    assert fp8.scheme_for("lm_head") is None


def test_targets_and_ignore():
    cfg = copy.deepcopy(W4A16)
    cfg["config_groups"]["attn_fp8"] = {  # a regex beats the class-name target of group_0
        "targets": ["re:.*self_attn\\.o_proj$"], "format": "float-quantized",
        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
    }
    qc = QuantConfig.from_dict(cfg)
    assert qc.kinds == {"w4a16", "fp8"}
    assert qc.scheme_for("model.language_model.layers.1.mlp.down_proj").kind == "w4a16"
    assert qc.scheme_for("model.language_model.layers.1.self_attn.o_proj").kind == "fp8"
    assert qc.scheme_for("model.vision_tower.transformer.layers.0.attention.q_proj") is None
    assert qc.scheme_for("model.multi_modal_projector.linear_1") is None
    assert qc.scheme_for("lm_head") is None
    assert qc.scheme_for("model.language_model.embed_tokens", class_name="Embedding") is None


def test_group_size_checked_against_the_layer():
    scheme = QuantConfig.from_dict(W4A16).scheme_for("x.mlp.up_proj")
    assert scheme.group_size_for(5120) == 128
    with pytest.raises(QuantConfigError, match="group_size 128 does not divide in_features 100"):
        scheme.group_size_for(100)
    channel = copy.deepcopy(W4A16)
    channel["config_groups"]["group_0"]["weights"].update(strategy="channel", group_size=None)
    assert QuantConfig.from_dict(channel).scheme_for("a").group_size_for(100) == 100


def _broken(base: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(base)
    node = cfg
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return cfg


@pytest.mark.parametrize("base,path,value,message", [
    (W4A16, "config_groups.group_0.weights.symmetric", False, r"weights\.symmetric is false: asymmetric"),
    (W4A16, "config_groups.group_0.weights.actorder", "group", r"weights\.actorder is 'group': act-order with g_idx"),
    (W4A16, "config_groups.group_0.weights.num_bits", 3, r"weights: num_bits=3"),
    (W4A16, "config_groups.group_0.weights.group_size", 12, r"weights\.group_size must be a positive multiple of 8"),
    (W4A16, "config_groups.group_0.input_activations",
     {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
     r"input_activations = .*dynamic per-token FP8"),
    (W4A16, "config_groups.group_0.format", "float-quantized", r"group_0\.format is 'float-quantized'"),
    (W4A16, "kv_cache_scheme", {"num_bits": 8, "type": "float"}, r"kv_cache_scheme is set"),
    (W4A16, "quantization_status", "frozen", r"quantization_status is 'frozen'"),
    (W4A16, "quant_method", "gptq", r"quant_method is 'gptq'"),
    (FP8_DYNAMIC, "config_groups.group_0.input_activations.strategy", "tensor", r"input_activations = "),
    (FP8_DYNAMIC, "config_groups.group_0.input_activations.dynamic", False, r"input_activations = "),
    (FP8_DYNAMIC, "config_groups.group_0.weights.strategy", "block", r"weights\.strategy is 'block'"),
    (FP8_DYNAMIC, "config_groups.group_0.output_activations", {"num_bits": 8}, r"output_activations is set"),
])
def test_refusals_name_the_field(base, path, value, message):
    with pytest.raises(QuantConfigError, match=message) as info:
        QuantConfig.from_dict(_broken(base, path, value))
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("quantization_config.")
