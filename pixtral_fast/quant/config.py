"""compressed-tensors `quantization_config` (in an HF config.json) -> which linears are quantized,
how, and in which on-disk format. Plain dicts in, frozen dataclasses out: reading a checkpoint
needs no compressed-tensors install.

Supported, per config group:
  * W4A16: weights {num_bits 4, type int, symmetric, strategy group (or channel)}, format
    `pack-quantized`, no input quantization;
  * FP8: weights {num_bits 8, type float, symmetric, strategy channel or tensor}, format
    `float-quantized`, inputs none or {num_bits 8, type float, strategy token, dynamic}.
Every field this module knows is type-checked as params.json fields are (a bool is a JSON
true/false, not the string "false"; an integer is not a bool), and every `re:` target compiled,
before any is used. Anything else is refused with a QuantConfigError (a ConfigError, so a
ValueError) naming the field.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pixtral_fast.config import ConfigError, read_json

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
MIXED_PRECISION = "mixed-precision"
ACT_NONE = "none"
ACT_FP8_DYNAMIC_TOKEN = "fp8_dynamic_token"

# The preset names a config group may use instead of a scheme ({"W4A16": ["Linear"]}).
_PRESETS = {
    "W4A16": {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                          "group_size": 128}},
    "FP8_DYNAMIC": {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                          "strategy": "token", "dynamic": True}},
}


class QuantConfigError(ConfigError):
    """A quantization_config we cannot run; the message names the field."""


@dataclass(frozen=True)
class WeightScheme:
    kind: str                 # "w4a16" | "fp8"
    strategy: str             # "group" | "channel" (w4a16); "channel" | "tensor" (fp8)
    group_size: int | None    # w4a16 "group" only; "channel" means one group of in_features
    activation: str = ACT_NONE  # ACT_NONE | ACT_FP8_DYNAMIC_TOKEN
    format: str = PACK_QUANTIZED

    def group_size_for(self, in_features: int) -> int:
        """The W4A16 group length for a layer with in_features inputs, checked against it."""
        if self.kind != "w4a16":
            raise ValueError(f"{self.kind} weights have no groups")
        size = in_features if self.strategy == "channel" else self.group_size
        if in_features % size:
            raise QuantConfigError(f"weights.group_size {size} does not divide in_features {in_features}")
        return size


@dataclass(frozen=True)
class QuantGroup:
    name: str
    targets: tuple[str, ...]
    scheme: WeightScheme


@dataclass(frozen=True)
class QuantConfig:
    groups: tuple[QuantGroup, ...]
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, config: dict) -> "QuantConfig":
        """config: a whole HF config.json dict, or its `quantization_config` alone."""
        return parse_quantization_config(config.get("quantization_config", config))

    @classmethod
    def from_folder(cls, path: str | Path) -> "QuantConfig | None":
        """The folder's config.json quantization, or None when it has none."""
        file, data = read_json(Path(path), "config.json")
        if "quantization_config" not in data:
            return None
        try:
            return parse_quantization_config(data["quantization_config"])
        except QuantConfigError as e:
            raise QuantConfigError(f"{file}: {e}") from None

    @property
    def kinds(self) -> set[str]:
        return {g.scheme.kind for g in self.groups}

    def ignored(self, module_name: str, class_name: str | tuple[str, ...] = "Linear") -> bool:
        return any(_matches(module_name, class_name, t) for t in self.ignore)

    def scheme_for(self, module_name: str, class_name: str | tuple[str, ...] = "Linear") -> WeightScheme | None:
        """The scheme of one module (HF name, e.g. `model.language_model.layers.0.mlp.up_proj`),
        None when no group targets it or `ignore` names it. As compressed-tensors matches: a target
        is an exact name, `re:<regex>` matched from the start of the name, or a class name (any of
        class_name, e.g. the names along the module's MRO); an exact-name target beats a regex,
        which beats a class name."""
        if self.ignored(module_name, class_name):
            return None
        best = None
        for group in self.groups:
            for target in group.targets:
                rank = _match_rank(module_name, class_name, target)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, group.scheme)
        return None if best is None else best[1]


def _match_rank(name: str, class_name: str | tuple[str, ...], target: str) -> int | None:
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) else None
    if target == name:
        return 0
    classes = (class_name,) if isinstance(class_name, str) else class_name
    return 2 if target in classes else None


def _matches(name: str, class_name: str | tuple[str, ...], target: str) -> bool:
    return _match_rank(name, class_name, target) is not None


# ---------------------------------------------------------------------------------------------
# parsing

# The JSON kinds of the fields read here (null always means "not set"). Keys not listed are
# compressed-tensors bookkeeping that does not change the math (observer settings, version, ...).
_TOP_FIELDS = {"quant_method": (str,), "format": (str,), "quantization_status": (str,), "config_groups": (dict,),
               "ignore": (list,), "kv_cache_scheme": (dict,), "sparsity_config": (dict,),
               "transform_config": (dict,), "global_compression_ratio": (int, float), "version": (str,)}
_GROUP_FIELDS = {"targets": (list,), "weights": (dict,), "input_activations": (dict,),
                 "output_activations": (dict,), "format": (str,)}
_ARGS_FIELDS = {"num_bits": (int,), "type": (str,), "symmetric": (bool,), "group_size": (int,), "strategy": (str,),
                "block_structure": (list,), "dynamic": (bool, str), "actorder": (bool, str),
                "observer": (str,), "observer_kwargs": (dict,)}
_TOP_FORMATS = (None, PACK_QUANTIZED, FLOAT_QUANTIZED, MIXED_PRECISION)
_ARG_TYPES = ("int", "float")
_STRATEGIES = ("tensor", "channel", "group", "block", "token", "tensor_group", "attn_head")
_ACT_ORDERS = ("group", "weight", "static", "dynamic")
_DYNAMIC_KINDS = ("local",)  # besides true / false
_KIND_NAMES = {str: "a string", dict: "an object", list: "a list", bool: "true or false", int: "an integer",
               float: "a number"}


def _is_kind(value, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true is a Python int: only a bool field takes it
        return bool in kinds
    return isinstance(value, kinds)


def _check_kinds(section: dict, fields: dict[str, tuple[type, ...]], where: str) -> None:
    for key, kinds in fields.items():
        value = section.get(key)
        if value is not None and not _is_kind(value, kinds):
            what = " or ".join(_KIND_NAMES[k] for k in kinds if not (k is int and float in kinds))
            raise QuantConfigError(f"{where}.{key} must be {what} (or null), got {_show(value)}")


def _check_choice(section: dict, key: str, choices: tuple[str, ...], where: str) -> None:
    value = section.get(key)
    if isinstance(value, str) and value.lower() not in choices:
        raise QuantConfigError(f"{where}.{key} is {_show(value)}: not a known value ({', '.join(choices)})")


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool, int, float)) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_targets(targets, where: str) -> tuple[str, ...]:
    """A list of strings, each `re:` one a regex Python compiles (compressed-tensors matches
    them with re.match): a bad one is refused here, not while the checkpoint is being read."""
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise QuantConfigError(f"{where} must be a list of strings")
    for target in targets:
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except (re.error, OverflowError, RecursionError) as e:
                raise QuantConfigError(f"{where}: target {_show(target)} is not a valid regular expression "
                                       f"({e})") from None
    return tuple(targets)


def _lower(value) -> str:
    return value.lower() if isinstance(value, str) else ""


def parse_quantization_config(qc: dict) -> QuantConfig:
    where = "quantization_config"
    if not isinstance(qc, dict):
        raise QuantConfigError(f"{where} must be a JSON object, got {type(qc).__name__}")
    _check_kinds(qc, _TOP_FIELDS, where)
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise QuantConfigError(f"{where}.quant_method is {method!r}; only {QUANT_METHOD!r} checkpoints are supported")
    if qc.get("kv_cache_scheme"):
        raise QuantConfigError(f"{where}.kv_cache_scheme is set: KV-cache quantization is not supported")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise QuantConfigError(f"{where}.{key} is set: sparse or transformed checkpoints are not supported")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise QuantConfigError(f"{where}.quantization_status is {status!r}: only 'compressed' checkpoints "
                               "(packed weights on disk) are supported")
    top_format = qc.get("format")
    if top_format not in _TOP_FORMATS:
        raise QuantConfigError(f"{where}.format is {_show(top_format)}: only "
                               f"{', '.join(f for f in _TOP_FORMATS if f)} checkpoints are read")
    groups_raw = qc.get("config_groups")
    if not groups_raw:
        raise QuantConfigError(f"{where}.config_groups must be a non-empty object")
    groups = [_parse_group(name, body, f"{where}.config_groups.{name}", top_format)
              for name, body in groups_raw.items()]
    ignore = _check_targets(qc.get("ignore") or [], f"{where}.ignore")
    return QuantConfig(groups=tuple(groups), ignore=ignore)


def _parse_group(name: str, body, where: str, top_format: str | None) -> QuantGroup:
    if isinstance(body, list):  # a preset name mapped to its targets
        if name.upper() not in _PRESETS:
            raise QuantConfigError(f"{where}: preset {name!r} is not supported; supported: {sorted(_PRESETS)}")
        body = {"targets": body, **_PRESETS[name.upper()]}
    if not isinstance(body, dict):
        raise QuantConfigError(f"{where} must be an object or a list of targets")
    _check_kinds(body, _GROUP_FIELDS, where)
    targets = _check_targets(body.get("targets"), f"{where}.targets")
    if not targets:
        raise QuantConfigError(f"{where}.targets must be a non-empty list of strings")
    scheme = _parse_scheme(body, where, body.get("format") or top_format)
    return QuantGroup(name=name, targets=targets, scheme=scheme)


def _check_args(args: dict, where: str) -> None:
    """The field kinds and known values of one compressed-tensors QuantizationArgs object."""
    _check_kinds(args, _ARGS_FIELDS, where)
    _check_choice(args, "type", _ARG_TYPES, where)
    _check_choice(args, "strategy", _STRATEGIES, where)
    _check_choice(args, "actorder", _ACT_ORDERS, where)
    _check_choice(args, "dynamic", _DYNAMIC_KINDS, where)


def _parse_scheme(body: dict, where: str, fmt: str | None) -> WeightScheme:
    if body.get("output_activations"):
        raise QuantConfigError(f"{where}.output_activations is set: output quantization is not supported")
    weights = body.get("weights")
    if not isinstance(weights, dict):
        raise QuantConfigError(f"{where}.weights must be an object (activation-only schemes are not supported)")
    w = f"{where}.weights"
    _check_args(weights, w)
    if weights.get("symmetric") is False:
        raise QuantConfigError(f"{w}.symmetric is false: asymmetric zero points are not supported")
    if weights.get("dynamic"):
        raise QuantConfigError(f"{w}.dynamic is {weights['dynamic']!r}: weights must be statically quantized")
    actorder = weights.get("actorder")
    if actorder is True or _lower(actorder) in ("group", "dynamic"):
        raise QuantConfigError(f"{w}.actorder is {actorder!r}: act-order with g_idx is not supported "
                               "('weight' ordering, which stores no g_idx, is)")
    if weights.get("block_structure"):
        raise QuantConfigError(f"{w}.block_structure is set: block-wise scales are not supported")
    num_bits, wtype = weights.get("num_bits"), _lower(weights.get("type") or "int")
    strategy = _lower(weights.get("strategy"))
    group_size = weights.get("group_size")
    if not strategy:  # compressed-tensors infers it from group_size
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    activation = _parse_activation(body.get("input_activations"), f"{where}.input_activations")
    if num_bits == 4 and wtype == "int":
        if strategy not in ("group", "channel"):
            raise QuantConfigError(f"{w}.strategy is {strategy!r}: 4-bit weights need 'group' or 'channel'")
        if strategy == "group" and (group_size is None or group_size <= 0 or group_size % 8):
            raise QuantConfigError(f"{w}.group_size must be a positive multiple of 8 for 4-bit groups, "
                                   f"got {group_size!r}")
        if activation != ACT_NONE:
            raise QuantConfigError(f"{where}.input_activations: 4-bit weights run with unquantized activations only")
        _check_format(fmt, PACK_QUANTIZED, where)
        return WeightScheme("w4a16", strategy, group_size if strategy == "group" else None, activation, PACK_QUANTIZED)
    if num_bits == 8 and wtype == "float":
        if strategy not in ("channel", "tensor"):
            raise QuantConfigError(f"{w}.strategy is {strategy!r}: FP8 weights need 'channel' or 'tensor' scales")
        _check_format(fmt, FLOAT_QUANTIZED, where)
        return WeightScheme("fp8", strategy, None, activation, FLOAT_QUANTIZED)
    raise QuantConfigError(f"{w}: num_bits={num_bits!r} type={weights.get('type')!r} is not supported "
                           "(4-bit int or 8-bit float only)")


def _check_format(fmt: str | None, expected: str, where: str) -> None:
    if fmt in (None, MIXED_PRECISION, expected):
        return
    raise QuantConfigError(f"{where}.format is {fmt!r}: these weights are read in the {expected!r} format only")


def _parse_activation(act, where: str) -> str:
    if not act:  # null or {}: the group's kinds are checked, so nothing else is falsy here
        return ACT_NONE
    _check_args(act, where)
    ok = (act.get("num_bits") == 8 and _lower(act.get("type")) == "float" and _lower(act.get("strategy")) == "token"
          and act.get("dynamic") is True and act.get("symmetric") is not False)
    if not ok:
        raise QuantConfigError(f"{where} = {json.dumps(act, sort_keys=True)}: only dynamic per-token FP8 "
                               "(num_bits 8, type float, strategy token, dynamic true, symmetric) is supported")
    return ACT_FP8_DYNAMIC_TOKEN
