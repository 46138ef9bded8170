"""Model configuration: ModelArgs, mirroring Mistral's params.json (and HF's config.json), and the
readers of both files.

Every field is type- and range-checked where it enters: the dataclasses check themselves
(config_sections.py), and the readers check the raw values first under the names the file uses,
HF's through config_hf.py, so a bad file fails in milliseconds with a ConfigError naming the file
and the field."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The sections and their checks live one module down (config_hf.py builds on them too); their
# names stay importable from here, where the package has always offered them.
from pixtral_fast.config_hf import hf_values
from pixtral_fast.config_sections import (
    IMG_BREAK_ID,
    IMG_END_ID,
    IMG_ID,
    MAX_CONFIG_BYTES,
    MAX_DIM,
    MAX_FFN_DIM,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_SEQ_LEN,
    MAX_VOCAB,
    MM_PROJECTORS,
    PATCH_MERGE,
    TEXT_FIELDS,
    VISION_FIELDS,
    ConfigError,
    Field,
    Names,
    TextArgs,
    VisionArgs,
    _check_text,
    _check_vision,
    _checked,
    _show,
    check_value,
)

__all__ = ["IMG_BREAK_ID", "IMG_END_ID", "IMG_ID", "MAX_CONFIG_BYTES", "MAX_DIM", "MAX_FFN_DIM", "MAX_HEAD_DIM",
           "MAX_HEADS", "MAX_IMAGE_SIZE", "MAX_LAYERS", "MAX_SEQ_LEN", "MAX_VOCAB", "MM_PROJECTORS", "PATCH_MERGE",
           "TEXT_FIELDS", "VISION_FIELDS", "ConfigError", "Field", "Names", "TextArgs", "VisionArgs", "check_value",
           "ModelArgs", "read_json", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that does not match its config, or that cannot be read. Defined here, below
    every loader and the quantized layers, which all raise it (pixtral_fast.weights re-exports it)."""


def _check_model(text: TextArgs, vision: VisionArgs | None, text_name: Names, name: Names) -> None:
    if not isinstance(text, TextArgs) or not isinstance(vision, (VisionArgs, type(None))):
        raise ConfigError(f"ModelArgs wants TextArgs and VisionArgs | None, got {type(text).__name__} and "
                          f"{type(vision).__name__}")
    if vision is not None:
        for field in ("image_token_id", "image_break_token_id", "image_end_token_id"):
            if getattr(vision, field) >= text.vocab_size:
                raise ConfigError(f"{name(field)} ({getattr(vision, field)}) is not a token of the "
                                  f"vocabulary ({text_name('vocab_size')} {text.vocab_size})")


@dataclass(frozen=True)
class ModelArgs:
    text: TextArgs
    vision: VisionArgs | None

    def __post_init__(self):
        _check_model(self.text, self.vision, str, lambda f: f"vision_encoder.{f}")

    @classmethod
    def from_params_json(cls, path: str | Path) -> "ModelArgs":
        """Reads Mistral's params.json (a file, or the folder holding one)."""
        path, raw = read_json(path, "params.json")
        vision_raw = raw.pop("vision_encoder", None)
        if "max_position_embeddings" in raw and "max_seq_len" not in raw:  # Mistral-Small-3.x's name for it
            raw["max_seq_len"] = raw.pop("max_position_embeddings")
        # Harmless bookkeeping keys seen in Mistral releases; none changes the math.
        text = _build(TextArgs, raw, path, "", ignored={"max_batch_size", "model_type"})
        vision = None
        if vision_raw is not None:
            if not isinstance(vision_raw, dict):
                raise ConfigError(f"{path}: vision_encoder must be a JSON object, got {_show(vision_raw)}")
            vision_raw = dict(vision_raw)
            if "image_size" not in vision_raw and "max_image_size" in vision_raw:
                vision_raw["image_size"] = vision_raw["max_image_size"]
            vision = _build(VisionArgs, vision_raw, path, "vision_encoder.")
        return _checked(path, lambda: cls(text=text, vision=vision))

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelArgs":
        """Reads an HF config.json: LlavaForConditionalGeneration with a Pixtral vision tower
        (Pixtral-12B, Pixtral-Large) or Mistral3ForConditionalGeneration (Mistral-Small-3.1/3.2)."""
        path, raw = read_json(path, "config.json")

        text_values, vision_values, name = hf_values(path, raw)
        text = _make(path, TextArgs, _check_text, text_values, name("text_config"))
        vision = _make(path, VisionArgs, _check_vision, vision_values, name("vision_config"))
        _checked(path, lambda: _check_model(text, vision, name("text_config"), name("vision_config")))
        return cls(text, vision)

    def to_params_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.text)
        if out["max_seq_len"] == TextArgs.max_seq_len:
            del out["max_seq_len"]
        if self.vision is not None:  # Pixtral-12B's params.json lists these; other fields when not default
            listed = ("hidden_size", "num_channels", "image_size", "patch_size", "rope_theta", "intermediate_size",
                      "num_hidden_layers", "num_attention_heads", "image_token_id")
            out["vision_encoder"] = {f.name: getattr(self.vision, f.name) for f in dataclasses.fields(VisionArgs)
                                     if f.name in listed or getattr(self.vision, f.name) != f.default}
        return out


def _build(cls, fields: dict[str, Any], path: Path, prefix: str, ignored: set[str] = frozenset()):
    """cls from one section of a params.json: fields all known, required ones present, each checked
    under its name in the file before the dataclass (and its arithmetic) sees it."""
    init = [f for f in dataclasses.fields(cls) if f.init]
    required = {f.name for f in init if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - fields.keys())
    unknown = sorted(fields.keys() - {f.name for f in init} - ignored)
    if missing:
        raise ConfigError(f"{path}: missing field(s) {[prefix + m for m in missing]}")
    if unknown:
        raise ConfigError(f"{path}: unsupported field(s) {[prefix + u for u in unknown]}; "
                          "refusing to guess their meaning")
    values = {f.name: fields.get(f.name, f.default) for f in init}
    return _make(path, cls, _check_text if cls is TextArgs else _check_vision, values, lambda f: prefix + f)


def _make(path: Path, cls, check: Callable[[Mapping[str, Any], Names], None], values: dict[str, Any], name: Names):
    """cls(**values) once check(values) passed under the file's own field names."""
    _checked(path, lambda: check(values, name))
    return cls(**values)


def read_json(path: str | Path, name: str) -> tuple[Path, dict[str, Any]]:
    """(the file, its object): `path` is the file itself or the folder holding `name`."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a {name} "
                          f"(limit {MAX_CONFIG_BYTES})")
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
        raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return path, raw
