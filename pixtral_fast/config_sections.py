"""The two sections of a model configuration, text and vision: dataclasses whose every field is
type- and range-checked where it enters (the bounds, the checks and the ConfigError they raise), so
a bad file fails in milliseconds naming the file and the field, never with a ZeroDivisionError deep
in the model build or a minutes-long build of 10**7 layers.

The bottom of the config layer: config_hf.py (HF's names for these fields) and config.py (ModelArgs
and the file readers) both build on it, and config.py reads HF files through config_hf.py."""
from __future__ import annotations

import dataclasses
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
    "add_pre_mm_projector_layer_norm": Field(bool),
}
PATCH_MERGE = "patch_merge"          # the only mm_projector_id there is (Mistral-Small-3.1/3.2)
MM_PROJECTORS = ("", PATCH_MERGE)


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
    projector, merge = v["mm_projector_id"], v["spatial_merge_size"]
    if not isinstance(projector, str) or projector not in MM_PROJECTORS:
        raise ConfigError(f"{name('mm_projector_id')} {_show(projector)} is not supported (known: "
                          f"{', '.join(repr(p) for p in MM_PROJECTORS)})")
    if merge > 1 and projector != PATCH_MERGE:
        raise ConfigError(f"{name('spatial_merge_size')} {merge} needs {name('mm_projector_id')} "
                          f"{PATCH_MERGE!r}, got {projector!r}")
    if v["image_size"] % (v["patch_size"] * merge):
        # mistral_common rounds image sides up to multiples of patch_size * merge: a limit that is not
        # one would let it produce images larger than the encoder takes.
        raise ConfigError(f"{name('image_size')} {v['image_size']} is not a multiple of {name('patch_size')} "
                          f"{v['patch_size']} * {name('spatial_merge_size')} {merge}")
    if v["max_image_size"] is not None and v["max_image_size"] != v["image_size"]:
        check_value(v["max_image_size"], _int(1, MAX_IMAGE_SIZE), name("max_image_size"))
        raise ConfigError(f"{name('max_image_size')} {v['max_image_size']} differs from {name('image_size')} "
                          f"{v['image_size']} (both mean the largest image side the encoder takes)")


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
    mm_projector_id: str = ""                       # "patch_merge": Mistral-Small-3.x's 2x2 merger
    add_pre_mm_projector_layer_norm: bool = False   # RMSNorm over ViT outputs before the merger
    max_image_size: int | None = None               # Mistral-Small-3.x repeat image_size under this name

    def __post_init__(self):
        _check_vision(_values(self), lambda f: f"vision_encoder.{f}")
        _as_floats(self, VISION_FIELDS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def merges_patches(self) -> bool:
        return self.mm_projector_id == PATCH_MERGE

    @property
    def pixels_per_token(self) -> int:
        """Side in pixels of the square one [IMG] token covers (patch_size * spatial_merge_size)."""
        return self.patch_size * self.spatial_merge_size


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


def _checked(path: Path, make: Callable[[], Any]):
    """make(), with the file named in front of any ConfigError it raises."""
    try:
        return make()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
