"""Model configuration: dataclasses mirroring Mistral's params.json (and HF's config.json)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMG_ID, IMG_BREAK_ID, IMG_END_ID = 10, 12, 13


class ConfigError(ValueError):
    """A params.json / config.json that does not describe a model we can run."""


def _build(cls, fields: dict[str, Any], where: str, ignored: frozenset[str] = frozenset()):
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    required = {f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - fields.keys())
    unknown = sorted(fields.keys() - names - ignored)
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    if unknown:
        raise ConfigError(f"{where}: unsupported field(s) {unknown}; refusing to guess their meaning")
    return cls(**{k: v for k, v in fields.items() if k in names})


@dataclass(frozen=True)
class VisionArgs:
    hidden_size: int
    num_channels: int
    image_size: int
    patch_size: int
    rope_theta: float
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_token_id: int = IMG_ID
    image_break_token_id: int = IMG_BREAK_ID
    image_end_token_id: int = IMG_END_ID
    adapter_bias: bool = True
    spatial_merge_size: int = 1
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_encoder.hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim {self.head_dim} must be a multiple of 4 for RoPE-2D")
        if not self.adapter_bias:
            raise ConfigError("vision_encoder.adapter_bias=false is not supported (Pixtral-12B has biases)")
        if self.spatial_merge_size != 1:
            raise ConfigError("vision_encoder.spatial_merge_size != 1 is not supported by Pixtral-12B")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    rope_theta: float
    norm_eps: float
    vocab_size: int
    max_seq_len: int = 131072  # Mistral-NeMo's context; params.json does not carry it

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")


@dataclass(frozen=True)
class ModelArgs:
    text: TextArgs
    vision: VisionArgs | None

    @classmethod
    def from_params_json(cls, path: str | Path) -> "ModelArgs":
        """Reads Mistral's params.json (a file, or the folder holding one)."""
        path, raw = _read_json(path, "params.json")
        vision_raw = raw.pop("vision_encoder", None)
        # Harmless bookkeeping keys seen in Mistral releases; none changes the math.
        text = _build(TextArgs, raw, str(path), ignored=frozenset({"max_batch_size", "model_type"}))
        vision = None
        if vision_raw is not None:
            vision_raw = dict(vision_raw)
            if vision_raw.pop("add_pre_mm_projector_layer_norm", False):
                raise ConfigError(f"{path}: add_pre_mm_projector_layer_norm is not part of Pixtral-12B")
            vision_raw.pop("mm_projector_id", None)
            vision = _build(VisionArgs, vision_raw, f"{path}: vision_encoder")
        return cls(text=text, vision=vision)

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelArgs":
        """Reads an HF LlavaForConditionalGeneration (Pixtral vision tower) config.json."""
        path, raw = _read_json(path, "config.json")
        try:
            tc, vc = raw["text_config"], raw["vision_config"]
        except KeyError as e:
            raise ConfigError(f"{path}: missing field {e.args[0]!r} (not a Llava/Pixtral config)") from None
        if vc.get("model_type", "pixtral") != "pixtral":
            raise ConfigError(f"{path}: vision_config.model_type {vc.get('model_type')!r} is not 'pixtral'")
        if tc.get("sliding_window") is not None:
            raise ConfigError(f"{path}: text_config.sliding_window={tc['sliding_window']} is not supported "
                              "(Pixtral-12B attends over the whole context)")
        if vc.get("hidden_act", "gelu") != "silu" or tc.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{path}: only SiLU-gated FFNs are supported (vision hidden_act "
                              f"{vc.get('hidden_act')!r}, text hidden_act {tc.get('hidden_act')!r})")
        if raw.get("projector_hidden_act", "gelu") != "gelu":
            raise ConfigError(f"{path}: projector_hidden_act {raw['projector_hidden_act']!r} is not 'gelu'")
        if raw.get("vision_feature_layer", -1) != -1:
            raise ConfigError(f"{path}: vision_feature_layer must be -1 (the last layer)")

        def need(d: dict, key: str, where: str):
            if key not in d:
                raise ConfigError(f"{path}: missing field {where}.{key}")
            return d[key]

        def theta(d: dict, where: str) -> float:
            if "rope_theta" in d:
                return float(d["rope_theta"])
            return float(need(d.get("rope_parameters") or {}, "rope_theta", f"{where}.rope_parameters"))

        n_heads = need(tc, "num_attention_heads", "text_config")
        dim = need(tc, "hidden_size", "text_config")
        text = TextArgs(
            dim=dim, n_layers=need(tc, "num_hidden_layers", "text_config"),
            head_dim=tc.get("head_dim") or dim // n_heads, hidden_dim=need(tc, "intermediate_size", "text_config"),
            n_heads=n_heads, n_kv_heads=tc.get("num_key_value_heads", n_heads),
            rope_theta=theta(tc, "text_config"), norm_eps=need(tc, "rms_norm_eps", "text_config"),
            vocab_size=need(tc, "vocab_size", "text_config"),
            # HF's Pixtral config claims 1,024,000 positions; NeMo was trained for 131,072.
            max_seq_len=min(tc.get("max_position_embeddings", TextArgs.max_seq_len), TextArgs.max_seq_len))
        vision = VisionArgs(
            hidden_size=need(vc, "hidden_size", "vision_config"), num_channels=vc.get("num_channels", 3),
            image_size=need(vc, "image_size", "vision_config"), patch_size=need(vc, "patch_size", "vision_config"),
            rope_theta=theta(vc, "vision_config"),
            intermediate_size=need(vc, "intermediate_size", "vision_config"),
            num_hidden_layers=need(vc, "num_hidden_layers", "vision_config"),
            num_attention_heads=need(vc, "num_attention_heads", "vision_config"),
            image_token_id=raw.get("image_token_index", IMG_ID))
        if vc.get("head_dim", vision.head_dim) != vision.head_dim:
            raise ConfigError(f"{path}: vision head_dim {vc['head_dim']} != hidden_size / num_attention_heads")
        return cls(text=text, vision=vision)

    def to_params_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.text)
        if out["max_seq_len"] == TextArgs.max_seq_len:
            del out["max_seq_len"]
        if self.vision is not None:
            v = self.vision
            out["vision_encoder"] = {k: getattr(v, k) for k in (
                "hidden_size", "num_channels", "image_size", "patch_size", "rope_theta", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "image_token_id")}
        return out


def _read_json(path: str | Path, name: str) -> tuple[Path, dict[str, Any]]:
    """(the file, its object): `path` is the file itself or the folder holding `name`."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return path, raw
