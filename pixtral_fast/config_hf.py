"""HF config.json (LlavaForConditionalGeneration: Pixtral-12B, Pixtral-Large; Mistral3ForConditionalGeneration:
Mistral-Small-3.1/3.2) -> the values of our TextArgs / VisionArgs, with the HF name of each field for
error messages. ModelArgs.from_hf_config is the entry point; this module only translates and refuses
what the format can say that we do not run."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pixtral_fast.config_sections import (IMG_BREAK_ID, IMG_END_ID, IMG_ID, TEXT_FIELDS, ConfigError, Names,
                                          TextArgs, VisionArgs, _check_vision, _checked, _int, _show, check_value)

_HF_TEXT = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "head_dim": "head_dim",
            "hidden_dim": "intermediate_size", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
            "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings"}
_HF_VISION = {"hidden_size": "hidden_size", "num_channels": "num_channels", "image_size": "image_size",
              "patch_size": "patch_size", "rope_theta": "rope_theta", "intermediate_size": "intermediate_size",
              "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads"}
_HF_TOP = {"image_token_id": "image_token_index", "adapter_bias": "multimodal_projector_bias",
           "spatial_merge_size": "spatial_merge_size"}
_MISSING = object()


# Mistral's 32768-token SentencePiece vocabulary (v7, Pixtral-Large) holds [IMG_BREAK]/[IMG_END]
# at 14/15; Tekken (Pixtral-12B, Mistral-Small-3.1/3.2) at 12/13.
_SENTENCEPIECE_V7_VOCAB, _SENTENCEPIECE_V7_MARKERS = 32768, (14, 15)


def image_marker_ids(path: Path, vocab_size: int) -> tuple[int, int]:
    """[IMG_BREAK] and [IMG_END] ids of an HF folder. HF's config has no field for them (the
    processor finds them by name in the tokenizer): read them from the folder's tokenizer.json when
    it has them, else from the vocabulary the model was built for."""
    tokenizer_json = Path(path).parent / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            added = json.loads(tokenizer_json.read_bytes()).get("added_tokens", [])
            ids = {t.get("content"): t.get("id") for t in added if isinstance(t, dict)}
        except (ValueError, AttributeError, RecursionError):
            ids = {}  # not ours to judge here: the tokenizer itself is checked when it is loaded
        found = ids.get("[IMG_BREAK]"), ids.get("[IMG_END]")
        if all(isinstance(i, int) and not isinstance(i, bool) for i in found):
            return found
    return _SENTENCEPIECE_V7_MARKERS if vocab_size == _SENTENCEPIECE_V7_VOCAB else (IMG_BREAK_ID, IMG_END_ID)


def ties_word_embeddings(raw: dict[str, Any]) -> bool:
    """Whether transformers ties this config's output head to its embedding: the top-level
    tie_word_embeddings, whose default is true for Mistral3 and false for Llava; Llava also takes
    text_config.tie_word_embeddings=true (older saves wrote it there). A checkpoint that holds
    lm_head anyway is read as it is, as transformers does when the two differ."""
    mistral3 = raw.get("model_type") == "mistral3"
    top = raw.get("tie_word_embeddings")
    text = raw.get("text_config")
    text_tied = isinstance(text, dict) and text.get("tie_word_embeddings") is True
    return (mistral3 if top is None else top is True) or (not mistral3 and text_tied)


# The rope_type each tower runs (transformers >= 5 writes it in rope_parameters): the text model's
# plain RoPE, the vision tower's 2D RoPE, which transformers' Pixtral calls "axial".
_ROPE_TYPES = {"text_config": ("default",), "vision_config": ("default", "axial")}


def _refuse_rope_scaling(path: Path, where: str, section: dict[str, Any]) -> None:
    """RoPE as Pixtral runs it: unscaled, at rope_theta. A scaled RoPE (yarn, linear, llama3 ...)
    changes every position's angle; running it unscaled would answer wrongly without a sign."""
    scaling = section.get("rope_scaling")
    if scaling is not None:
        raise ConfigError(f"{path}: {where}.rope_scaling={_show(scaling)} is not supported (refusing to guess: "
                          "only unscaled RoPE is run; null or absent is accepted)")
    params = section.get("rope_parameters")
    if not isinstance(params, dict):
        return  # absent; any other value is refused where rope_theta is read
    kind = next((params[k] for k in ("rope_type", "type") if params.get(k) is not None), "default")
    allowed = _ROPE_TYPES[where]
    if not isinstance(kind, str) or kind not in allowed:
        raise ConfigError(f"{path}: {where}.rope_parameters.rope_type={_show(kind)} is not supported (refusing to "
                          f"guess: only unscaled RoPE is run: {' or '.join(map(repr, allowed))})")


def hf_values(path: Path, raw: dict[str, Any]) -> tuple[dict, dict, Callable[[str], Names]]:
    """Our TextArgs / VisionArgs values from an HF config, and the HF name of each field."""
    sections = {}
    for key in ("text_config", "vision_config"):
        if not isinstance(raw.get(key), dict):
            what = "missing" if key not in raw else f"not a JSON object ({_show(raw[key])})"
            raise ConfigError(f"{path}: {key} is {what} (not a Llava/Pixtral config)")
        sections[key] = raw[key]
    tc, vc = sections["text_config"], sections["vision_config"]

    def name(section: str) -> Names:
        table = _HF_TEXT if section == "text_config" else _HF_VISION
        return lambda f: _HF_TOP[f] if f in _HF_TOP else f"{section}.{table.get(f, f)}"

    def refuse_unless(where: str, value: Any, allowed: Any, why: str) -> None:
        if value != allowed or type(value) is not type(allowed):
            raise ConfigError(f"{path}: {where}={_show(value)} is not supported ({why})")

    refuse_unless("vision_config.model_type", vc.get("model_type", "pixtral"), "pixtral", "a Pixtral vision tower")
    refuse_unless("text_config.sliding_window", tc.get("sliding_window"), None,
                  "Pixtral-12B attends over the whole context")
    refuse_unless("vision_config.hidden_act", vc.get("hidden_act", "gelu"), "silu", "a SiLU-gated ViT FFN")
    refuse_unless("text_config.hidden_act", tc.get("hidden_act", "silu"), "silu", "a SiLU-gated FFN")
    refuse_unless("projector_hidden_act", raw.get("projector_hidden_act", "gelu"), "gelu", "an erf-GELU adapter")
    refuse_unless("vision_feature_layer", raw.get("vision_feature_layer", -1), -1, "features of the last layer")
    refuse_unless("vision_feature_select_strategy", raw.get("vision_feature_select_strategy", "full"), "full",
                  "every patch feature is kept; 'default' would drop the first")
    refuse_unless("text_config.model_type", tc.get("model_type", "mistral"), "mistral", "a Mistral text model")
    for where, section in (("text_config", tc), ("vision_config", vc)):
        _refuse_rope_scaling(path, where, section)
    # Mistral-Small-3.x: Mistral3ForConditionalGeneration = the Llava layout plus RMSNorm and patch merger
    # in the projector (always both), adapter bias off by default.
    mistral3 = raw.get("model_type") == "mistral3"
    if not mistral3:
        refuse_unless("model_type", raw.get("model_type", "llava"), "llava", "Llava (Pixtral-12B, Pixtral-Large) "
                      "or mistral3 (Mistral-Small-3.1/3.2)")
    for where, section in (("tie_word_embeddings", raw), ("text_config.tie_word_embeddings", tc)):
        if section.get("tie_word_embeddings") not in (None, True, False):
            raise ConfigError(f"{path}: {where} must be true or false, got {_show(section['tie_word_embeddings'])}")

    def need(d: dict, key: str, where: str, default: Any = _MISSING) -> Any:
        if d.get(key) is None:  # HF writes null for "not set"
            if default is _MISSING:
                raise ConfigError(f"{path}: missing field {where}.{key}")
            return default
        return d[key]

    def theta(d: dict, where: str) -> Any:
        if "rope_theta" in d:
            return d["rope_theta"]
        params = d.get("rope_parameters")  # transformers >= 5 moved it here
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: missing field {where}.rope_theta (or {where}.rope_parameters.rope_theta)")
        return need(params, "rope_theta", f"{where}.rope_parameters")

    text = {f: need(tc, hf, "text_config") for f, hf in _HF_TEXT.items()
            if f not in ("head_dim", "n_kv_heads", "rope_theta", "max_seq_len")}
    text["rope_theta"] = theta(tc, "text_config")
    text["n_kv_heads"] = need(tc, "num_key_value_heads", "text_config", text["n_heads"])
    if tc.get("head_dim") is None:  # HF's default: hidden_size / num_attention_heads
        check_value(text["dim"], TEXT_FIELDS["dim"], f"{path}: text_config.hidden_size")
        check_value(text["n_heads"], TEXT_FIELDS["n_heads"], f"{path}: text_config.num_attention_heads")
    text["head_dim"] = text["dim"] // text["n_heads"] if tc.get("head_dim") is None else tc["head_dim"]
    # HF's Pixtral config claims 1,024,000 positions; NeMo was trained for 131,072.
    positions = need(tc, "max_position_embeddings", "text_config", TextArgs.max_seq_len)
    check_value(positions, _int(1, None), f"{path}: text_config.max_position_embeddings")
    text["max_seq_len"] = min(positions, TextArgs.max_seq_len)

    vision = {f: need(vc, hf, "vision_config") for f, hf in _HF_VISION.items() if f not in ("num_channels", "rope_theta")}
    vision["num_channels"] = need(vc, "num_channels", "vision_config", 3)
    vision["rope_theta"] = theta(vc, "vision_config")
    vision["image_token_id"] = need(raw, "image_token_index", "config", IMG_ID)
    if isinstance(text.get("vocab_size"), int):  # (a bad vocab_size is refused with its name below)
        vision["image_break_token_id"], vision["image_end_token_id"] = image_marker_ids(path, text["vocab_size"])
    vision["adapter_bias"] = need(raw, "multimodal_projector_bias", "config", not mistral3)
    if mistral3:
        vision["spatial_merge_size"] = need(raw, "spatial_merge_size", "config", 2)
        vision["mm_projector_id"] = "patch_merge"
        vision["add_pre_mm_projector_layer_norm"] = True
    elif "spatial_merge_size" in raw:
        refuse_unless("spatial_merge_size", raw["spatial_merge_size"], 1, "a Llava config merges no patches")
    vision_defaults = {f.name: f.default for f in dataclasses.fields(VisionArgs) if f.name not in vision}
    vision = vision_defaults | vision
    _checked(path, lambda: _check_vision(vision, name("vision_config")))
    if vc.get("head_dim") is not None and vc["head_dim"] != vision["hidden_size"] // vision["num_attention_heads"]:
        raise ConfigError(f"{path}: vision_config.head_dim {_show(vc['head_dim'])} != hidden_size / "
                          "num_attention_heads")
    return text, vision, name
