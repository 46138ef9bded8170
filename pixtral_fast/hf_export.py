"""Consolidated (Mistral) -> HF export: the inverse of weights.hf_to_consolidated_name and of the
loader's q/k un-permutation, plus the config.json that transformers builds the same model from
(LlavaForConditionalGeneration for Pixtral-12B and Pixtral-Large, Mistral3ForConditionalGeneration
for Mistral-Small-3.1/3.2). Keys are written in the layout transformers' save_pretrained writes
(language_model.model.*, vision_tower.*, multi_modal_projector.*), which every release loads.
The tokenizer and processor files that go with them: pixtral_fast.hf_tokenizer."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pixtral_fast.config import ModelArgs

_TO_HF = [(re.compile(p), r) for p, r in [
    (r"^tok_embeddings\.", "language_model.model.embed_tokens."),
    (r"^norm\.", "language_model.model.norm."),
    (r"^output\.", "language_model.lm_head."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"language_model.model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"language_model.model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"language_model.model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"language_model.model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"language_model.model.layers.\1.mlp.up_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"language_model.model.layers.\1.mlp.down_proj."),
    (r"^vision_encoder\.transformer\.layers\.(\d+)\.attention\.w([qkvo])\.",
     r"vision_tower.transformer.layers.\1.attention.\2_proj."),
    (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w1\.",
     r"vision_tower.transformer.layers.\1.feed_forward.gate_proj."),
    (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w3\.",
     r"vision_tower.transformer.layers.\1.feed_forward.up_proj."),
    (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w2\.",
     r"vision_tower.transformer.layers.\1.feed_forward.down_proj."),
    (r"^vision_encoder\.", "vision_tower."),
    (r"^vision_language_adapter\.w_in\.", "multi_modal_projector.linear_1."),
    (r"^vision_language_adapter\.w_out\.", "multi_modal_projector.linear_2."),
    (r"^patch_merger\.", "multi_modal_projector.patch_merger."),
    (r"^pre_mm_projector_norm\.", "multi_modal_projector.norm."),
]]


def consolidated_to_hf_name(name: str) -> str:
    """The HF key of a consolidated key (the first rule that matches; each key matches one)."""
    for pattern, repl in _TO_HF:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    raise ValueError(f"{name!r} is not a Pixtral-family checkpoint key")


def is_mistral3(args: ModelArgs) -> bool:
    """Mistral-Small-3.x (merger and pre-merger norm) is HF's Mistral3; every other variant is Llava."""
    return args.vision is not None and args.vision.merges_patches


def llava_config(args: ModelArgs) -> dict[str, Any]:
    """The config.json that HF's LlavaForConditionalGeneration saves for this model."""
    t, v = args.text, args.vision
    if v is None:
        raise ValueError("llava_config: an HF Llava config needs a vision encoder (args.vision is None)")
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": v.image_token_id, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "multimodal_projector_bias": v.adapter_bias,
        "text_config": {
            "model_type": "mistral", "hidden_size": t.dim, "num_hidden_layers": t.n_layers, "head_dim": t.head_dim,
            "intermediate_size": t.hidden_dim, "num_attention_heads": t.n_heads, "num_key_value_heads": t.n_kv_heads,
            "rope_theta": t.rope_theta, "rms_norm_eps": t.norm_eps, "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_seq_len, "sliding_window": None, "hidden_act": "silu",
            "tie_word_embeddings": False},
        "vision_config": {
            "model_type": "pixtral", "hidden_size": v.hidden_size, "num_channels": v.num_channels,
            "image_size": v.image_size, "patch_size": v.patch_size, "rope_theta": v.rope_theta,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "head_dim": v.head_dim, "hidden_act": "silu"},
    }


def hf_config(args: ModelArgs, tied: bool = False) -> dict[str, Any]:
    """The config.json transformers builds this model from; `tied`: the output head is the embedding."""
    config = llava_config(args)
    # Said at the top level (transformers 5 ties Mistral3's output by default) and in text_config
    # (where older transformers read Llava's).
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = tied
    v = args.vision
    if not is_mistral3(args):
        return config
    if not v.add_pre_mm_projector_layer_norm:
        raise ValueError("HF's Mistral3 always has the pre-merger RMSNorm; this model has a merger without it")
    del config["vision_feature_select_strategy"]
    config.update(architectures=["Mistral3ForConditionalGeneration"], model_type="mistral3",
                  spatial_merge_size=v.spatial_merge_size)
    return config


def output_is_embedding(state: dict[str, torch.Tensor]) -> bool:
    """A tied model: its output head holds exactly its embedding (one tensor, or an equal copy, as
    a consolidated file made from a tied HF folder stores it)."""
    out, emb = state["output.weight"], state["tok_embeddings.weight"]
    return out is emb or (out.shape == emb.shape and out.dtype == emb.dtype and torch.equal(out, emb))


def to_hf_state(state: dict[str, torch.Tensor], args: ModelArgs, tied: bool = False) -> dict[str, torch.Tensor]:
    """HF keys, with wq/wk rows permuted back to HF's rotate-half order; `tied`: no lm_head (what
    transformers saves for a tied model)."""
    from pixtral_fast.weights import apply_hf_rope_permutation, rope_heads

    out = {}
    for name, t in state.items():
        if tied and name == "output.weight":
            continue
        heads = rope_heads(name, args)
        out[consolidated_to_hf_name(name)] = t if heads is None else apply_hf_rope_permutation(t, heads)
    return out


def convert_consolidated_to_hf(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16,
                               processor: bool = True) -> Path:
    """A consolidated folder (params.json + consolidated.safetensors) -> an HF folder (config.json +
    model.safetensors) that transformers' from_pretrained loads; with `processor`, also the
    tokenizer, chat template and processor files that AutoProcessor and vLLM need
    (pixtral_fast.hf_tokenizer; they need transformers). processor=False is for callers that only
    read the weights back (quantization) and need neither transformers nor the seconds it takes."""
    from pixtral_fast.weights import CONSOLIDATED, load_state_dict

    src, dst = Path(src), Path(dst)
    if not (src / CONSOLIDATED).is_file():
        raise FileNotFoundError(f"{src}: no {CONSOLIDATED} (export-hf reads Mistral's consolidated format)")
    args = ModelArgs.from_params_json(src)
    if args.vision is None:
        raise ValueError(f"{src}: export-hf writes Llava/Mistral3 folders, which need a vision encoder")
    if processor:
        _tokenizer_converts(src)  # before the weights: a missing transformers fails an export at once
    state = load_state_dict(src, args, "cpu", dtype, progress=False)
    tied = output_is_embedding(state)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in to_hf_state(state, args, tied).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config(args, tied), indent=2) + "\n")
    if processor:
        from pixtral_fast.hf_tokenizer import write_hf_processor

        write_hf_processor(src, dst, args.vision)
    return dst


def _tokenizer_converts(src: Path) -> None:
    """ImportError (naming the pip install) unless the checkpoint's tokenizer can be converted here."""
    from pixtral_fast.hf_tokenizer import hf_tokenizer, tekken_source

    tekken = tekken_source(src)
    if tekken is not None:
        hf_tokenizer(tekken)  # cached: write_hf_processor reuses it
