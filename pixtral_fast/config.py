"""Model configuration: dataclasses mirroring Mistral's params.json (and HF's config.json).

Every field is type- and range-checked where it enters: the dataclasses check themselves, and the
readers check the raw values first under the names the file uses, so a bad file fails in
milliseconds with a ConfigError naming the file and the field, never with a ZeroDivisionError deep
in the model build or a minutes-long build of 10**7 layers."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMG_ID, IMG_BREAK_ID, IMG_END_ID = 10, 12, 13

# Upper bounds: several times the largest released Mistral multimodal model (Pixtral-Large: 88
# layers, dim 12288, FFN 28672, 96 heads; Tekken: 131072 tokens; images 1024-1540 px), low enough
# that a typo fails at once instead of building (or allocating) something absurd.
MAX_LAYERS = 512
MAX_DIM = 65_536
MAX_FFN_DIM = 262_144
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 4_194_304
MAX_SEQ_LEN = 1_048_576
MAX_IMAGE_SIZE = 8192          # pixels a side
MAX_CONFIG_BYTES = 1 << 20     # a params.json / config.json is a few hundred bytes


class ConfigError(ValueError):
    """A params.json / config.json that does not describe a model we can run."""


@dataclass(frozen=True)
class Field:
    """What one config value may be: its kind (int, float or bool) and its range."""
    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False      # lo itself is refused (norm_eps > 0)
    hi_open: bool = False

    def describe(self) -> str:
        if self.lo is not None and self.lo == self.hi:
            return f"{self.lo}"
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi}"
        return " and ".join(x for x in (lo, hi) if x)


def _int(lo: int, hi: int | None) -> Field:
    return Field(int, lo, hi)


POSITIVE = Field(float, 0, None, lo_open=True)
EPS = Field(float, 0, 1, lo_open=True, hi_open=True)
TOKEN_ID = _int(0, MAX_VOCAB - 1)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"~1e{len(str(abs(value))) - 1}"
    return text if len(text) <= 40 else text[:37] + "..."


def check_value(value: Any, spec: Field, name: str) -> None:
    """Raises ConfigError naming `name` unless `value` is of `spec`'s kind and in its range."""
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {_show(value)}")
        return
    kinds = (int, float) if spec.kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds):  # JSON true is a Python int: refused
        what = "a number" if spec.kind is float else "an integer"
        raise ConfigError(f"{name} must be {what}, got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    low = spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo)
    high = spec.hi is not None and (value >= spec.hi if spec.hi_open else value > spec.hi)
    if low or high:
        raise ConfigError(f"{name} = {_show(value)} is out of range (must be {spec.describe()})")


Names = Callable[[str], str]  # our field name -> the name the user wrote (with its section)


def _check_fields(values: Mapping[str, Any], specs: Mapping[str, Field], name: Names) -> None:
    for field, spec in specs.items():
        check_value(values[field], spec, name(field))


TEXT_FIELDS = {
    "dim": _int(1, MAX_DIM), "n_layers": _int(1, MAX_LAYERS), "head_dim": _int(2, MAX_HEAD_DIM),
    "hidden_dim": _int(1, MAX_FFN_DIM), "n_heads": _int(1, MAX_HEADS), "n_kv_heads": _int(1, MAX_HEADS),
    "rope_theta": POSITIVE, "norm_eps": EPS, "vocab_size": _int(1, MAX_VOCAB), "max_seq_len": _int(1, MAX_SEQ_LEN),
}
VISION_FIELDS = {
    "hidden_size": _int(1, MAX_DIM), "num_channels": _int(3, 3), "image_size": _int(1, MAX_IMAGE_SIZE),
    "patch_size": _int(1, MAX_IMAGE_SIZE), "rope_theta": POSITIVE, "intermediate_size": _int(1, MAX_FFN_DIM),
    "num_hidden_layers": _int(1, MAX_LAYERS), "num_attention_heads": _int(1, MAX_HEADS),
    "image_token_id": TOKEN_ID, "image_break_token_id": TOKEN_ID, "image_end_token_id": TOKEN_ID,
    "adapter_bias": Field(bool), "spatial_merge_size": _int(1, 64), "norm_eps": EPS,
}


def _check_text(v: Mapping[str, Any], name: Names) -> None:
    _check_fields(v, TEXT_FIELDS, name)
    if v["n_heads"] % v["n_kv_heads"]:
        raise ConfigError(f"{name('n_heads')} ({v['n_heads']}) must be a multiple of "
                          f"{name('n_kv_heads')} ({v['n_kv_heads']})")
    if v["head_dim"] % 2:
        raise ConfigError(f"{name('head_dim')} ({v['head_dim']}) must be even (RoPE rotates pairs)")


def _check_vision(v: Mapping[str, Any], name: Names) -> None:
    _check_fields(v, VISION_FIELDS, name)
    hidden, heads = v["hidden_size"], v["num_attention_heads"]
    if hidden % heads:
        raise ConfigError(f"{name('hidden_size')} ({hidden}) must be a multiple of "
                          f"{name('num_attention_heads')} ({heads})")
    head_dim = hidden // heads
    if head_dim % 4 or head_dim > MAX_HEAD_DIM:
        raise ConfigError(f"vision head_dim = {name('hidden_size')} / {name('num_attention_heads')} = {head_dim} "
                          f"must be a multiple of 4 (RoPE-2D) and <= {MAX_HEAD_DIM}")
    if v["patch_size"] > v["image_size"]:
        raise ConfigError(f"{name('patch_size')} ({v['patch_size']}) is larger than "
                          f"{name('image_size')} ({v['image_size']})")
    ids = ("image_token_id", "image_break_token_id", "image_end_token_id")
    if len({v[k] for k in ids}) != 3:
        raise ConfigError(f"{', '.join(name(k) for k in ids)} must be three different tokens, got "
                          f"{[v[k] for k in ids]}")
    if not v["adapter_bias"]:
        raise ConfigError(f"{name('adapter_bias')}=false is not supported (Pixtral-12B's adapter has biases)")
    if v["spatial_merge_size"] != 1:
        raise ConfigError(f"{name('spatial_merge_size')}={v['spatial_merge_size']} is not supported "
                          "(Pixtral-12B merges no patches)")


def _values(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _as_floats(obj, specs: Mapping[str, Field]) -> None:
    for field, spec in specs.items():  # a JSON 10000 means 10000.0; keep one type per field
        if spec.kind is float:
            object.__setattr__(obj, field, float(getattr(obj, field)))


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
        _check_vision(_values(self), lambda f: f"vision_encoder.{f}")
        _as_floats(self, VISION_FIELDS)

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
        _check_text(_values(self), str)
        _as_floats(self, TEXT_FIELDS)


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
        # Harmless bookkeeping keys seen in Mistral releases; none changes the math.
        text = _build(TextArgs, raw, path, "", ignored={"max_batch_size", "model_type"})
        vision = None
        if vision_raw is not None:
            if not isinstance(vision_raw, dict):
                raise ConfigError(f"{path}: vision_encoder must be a JSON object, got {_show(vision_raw)}")
            vision_raw = dict(vision_raw)
            pre_norm = vision_raw.pop("add_pre_mm_projector_layer_norm", False)
            if pre_norm is not False:
                raise ConfigError(f"{path}: vision_encoder.add_pre_mm_projector_layer_norm={_show(pre_norm)} "
                                  "is not supported (Pixtral-12B has no such norm)")
            vision_raw.pop("mm_projector_id", None)
            vision = _build(VisionArgs, vision_raw, path, "vision_encoder.")
        return _checked(path, lambda: cls(text=text, vision=vision))

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelArgs":
        """Reads an HF LlavaForConditionalGeneration (Pixtral vision tower) config.json."""
        path, raw = read_json(path, "config.json")
        text_values, vision_values, name = _hf_values(path, raw)
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


def _checked(path: Path, make: Callable[[], Any]):
    """make(), with the file named in front of any ConfigError it raises."""
    try:
        return make()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


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


# -- HF Llava/Pixtral config.json -------------------------------------------------------------------

_HF_TEXT = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "head_dim": "head_dim",
            "hidden_dim": "intermediate_size", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
            "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings"}
_HF_VISION = {"hidden_size": "hidden_size", "num_channels": "num_channels", "image_size": "image_size",
              "patch_size": "patch_size", "rope_theta": "rope_theta", "intermediate_size": "intermediate_size",
              "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads"}
_HF_TOP = {"image_token_id": "image_token_index", "adapter_bias": "multimodal_projector_bias"}
_MISSING = object()


def _hf_values(path: Path, raw: dict[str, Any]) -> tuple[dict, dict, Callable[[str], Names]]:
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
    vision["adapter_bias"] = need(raw, "multimodal_projector_bias", "config", True)
    vision_defaults = {f.name: f.default for f in dataclasses.fields(VisionArgs) if f.name not in vision}
    vision = vision_defaults | vision
    _checked(path, lambda: _check_vision(vision, name("vision_config")))
    if vc.get("head_dim") is not None and vc["head_dim"] != vision["hidden_size"] // vision["num_attention_heads"]:
        raise ConfigError(f"{path}: vision_config.head_dim {_show(vc['head_dim'])} != hidden_size / "
                          "num_attention_heads")
    return text, vision, name
