"""A tiny HF Llava checkpoint quantized by compressed-tensors itself, the way LLM Compressor
does it: apply the quantization config, set each layer's scale (round-to-nearest: min-max of its
groups / channels, compressed-tensors' own calculate_qparams), compress_model, save_pretrained,
update_config. The language model's linears are quantized; lm_head, the vision tower and the
projector stay dense (as the published checkpoints keep them)."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.support.hf_peer import tiny_hf_model

IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def save_ct_quantized(folder: Path, preset: str, group_size: int = 32, seed: int = 0) -> Path:
    """preset: a compressed-tensors preset name (W4A16, FP8_DYNAMIC) or FP8_WEIGHT_ONLY (e4m3 with
    per-channel scales, activations unquantized: what `pixtral-fast quantize --scheme fp8` writes)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_hf_model(seed)
    if preset == "FP8_WEIGHT_ONLY":
        weights = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
        config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                    ignore=IGNORE)
        preset = "group_0"
    else:
        config = QuantizationConfig(config_groups={preset: ["Linear"]}, ignore=IGNORE)
    if config.config_groups[preset].weights.strategy == "group":
        config.config_groups[preset].weights.group_size = group_size
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or not hasattr(module, "weight_scale"):
                continue
            w, a = module.weight, scheme.weights
            if a.strategy == "group":
                groups = w.view(w.shape[0], -1, a.group_size)
                low, high = groups.amin(-1), groups.amax(-1)
            else:
                low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            scale, zero = calculate_qparams(low, high, a)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return folder
