"""Hostile quantized checkpoints: nothing in them is silently dropped or misread.

* Every tensor under a quantized layer is one its format stores: a bias (which the quantized
  kernels would not add) or any other tensor there is refused by name, as the dense loader
  refuses a tensor the model does not have.
* Every field of `quantization_config` has the JSON kind compressed-tensors writes: the string
  "false" is not false, true is not the integer 1; a `re:` target Python cannot compile is a
  ConfigError naming it.
* A truncated or empty shard, or a bad regex target, is a one-line user error of the real
  `pixtral-fast` command (exit 2), dense and quantized alike, naming the file.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import pixtral_fast as pf
from pixtral_fast.config import ConfigError
from pixtral_fast.quant import QuantConfig, QuantConfigError
from pixtral_fast.quantize_checkpoint import quantize_checkpoint
from pixtral_fast.tiny import make_tiny
from pixtral_fast.weights import CONSOLIDATED, CheckpointError
from tests.test_cli_errors import RUN, assert_one_error_line, entry, run_main
from tests.test_quant_config import FP8_DYNAMIC, W4A16, _broken

Q_PROJ = "language_model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """{scheme: folder}: the tiny model quantized by `pixtral-fast quantize` (groups of 32)."""
    root = tmp_path_factory.mktemp("quantized")
    return {scheme: quantize_checkpoint(tiny, root / scheme, scheme, group_size=32, progress=False)
            for scheme in ("w4a16", "fp8")}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _with_tensors(folder, dst, **extra: torch.Tensor):
    """A copy of the quantized folder whose weights file holds `extra` as well."""
    dst = _copy(folder, dst)
    state = load_file(dst / "model.safetensors")
    save_file(state | extra, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _load(folder):
    return pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)


# -- every tensor under a quantized layer is consumed or refused -----------------------------------

def test_the_unchanged_copies_load(quantized, tmp_path):
    """The refusals below come from the added tensor alone."""
    for scheme, folder in quantized.items():
        _load(_with_tensors(folder, tmp_path / scheme))


@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_a_bias_on_a_quantized_layer_is_refused_by_name(quantized, tmp_path, scheme):
    folder = _with_tensors(quantized[scheme], tmp_path / "q", **{f"{Q_PROJ}.bias": torch.ones(256)})
    with pytest.raises(CheckpointError, match=rf"bias.*not supported.*{Q_PROJ}\.bias \({scheme}\)"):
        _load(folder)


@pytest.mark.parametrize("scheme,suffix", [
    ("w4a16", "weight_bogus"), ("w4a16", "weight_scale_extra"), ("w4a16", "weight"), ("w4a16", "input_scales"),
    ("fp8", "weight_bogus"), ("fp8", "weight_shape"), ("fp8", "weight_packed_extra"),
])
def test_an_unexpected_tensor_under_a_quantized_layer_is_refused_by_name(quantized, tmp_path, scheme, suffix):
    folder = _with_tensors(quantized[scheme], tmp_path / "q", **{f"{Q_PROJ}.{suffix}": torch.ones(4)})
    with pytest.raises(CheckpointError, match=rf"unexpected tensors under quantized layers.*{Q_PROJ}\.{suffix}"):
        _load(folder)


def test_a_tensor_name_without_a_dot_is_named_as_unexpected(quantized, tmp_path):
    folder = _with_tensors(quantized["w4a16"], tmp_path / "q", stray=torch.ones(4))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): stray"):
        _load(folder)


@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_two_spellings_of_one_dense_weight_are_refused(quantized, tmp_path, scheme):
    """transformers' old and new names of lm_head side by side: neither is silently dropped."""
    lm_head = load_file(quantized[scheme] / "model.safetensors")["language_model.lm_head.weight"]
    folder = _with_tensors(quantized[scheme], tmp_path / "q", **{"lm_head.weight": torch.zeros_like(lm_head)})
    with pytest.raises(CheckpointError, match="name the same weight: .*lm_head.weight"):
        _load(folder)


@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_a_non_floating_dense_weight_is_refused_as_the_dense_loader_refuses_it(quantized, tmp_path, scheme):
    """A dense tensor of a quantized checkpoint (the final norm) stored as integers is named, not
    cast into a weight: the one header reader's records go through the dense loader's check."""
    norm = "language_model.model.norm.weight"
    weights = load_file(quantized[scheme] / "model.safetensors")[norm]
    folder = _with_tensors(quantized[scheme], tmp_path / "q", **{norm: weights.to(torch.int32)})
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) of a non-floating dtype .*: {norm} \(I32\)"):
        _load(folder)


# -- quantization_config: each field of its kind ----------------------------------------------------

WEIGHTS = "config_groups.group_0.weights"
ACTS = "config_groups.group_0.input_activations"


@pytest.mark.parametrize("base,path,value,message", [
    (W4A16, f"{WEIGHTS}.symmetric", "false", r"weights\.symmetric must be true or false .*\"false\""),
    (W4A16, f"{WEIGHTS}.symmetric", 0, r"weights\.symmetric must be true or false"),
    (W4A16, f"{WEIGHTS}.num_bits", "4", r"weights\.num_bits must be an integer"),
    (W4A16, f"{WEIGHTS}.num_bits", 4.0, r"weights\.num_bits must be an integer"),
    (W4A16, f"{WEIGHTS}.group_size", True, r"weights\.group_size must be an integer .*true"),
    (W4A16, f"{WEIGHTS}.group_size", "32", r"weights\.group_size must be an integer"),
    (W4A16, f"{WEIGHTS}.type", 4, r"weights\.type must be a string"),
    (W4A16, f"{WEIGHTS}.type", "integer", r"weights\.type is \"integer\": not a known value"),
    (W4A16, f"{WEIGHTS}.strategy", ["group"], r"weights\.strategy must be a string"),
    (W4A16, f"{WEIGHTS}.dynamic", "false", r"weights\.dynamic is \"false\": not a known value"),
    (W4A16, f"{WEIGHTS}.actorder", "sometimes", r"weights\.actorder is \"sometimes\": not a known value"),
    (W4A16, f"{WEIGHTS}.actorder", True, r"weights\.actorder is True: act-order"),
    (W4A16, f"{WEIGHTS}.block_structure", "128x128", r"weights\.block_structure must be a list"),
    (W4A16, "config_groups.group_0.targets", "Linear", r"group_0\.targets must be a list"),
    (W4A16, "config_groups.group_0.format", 1, r"group_0\.format must be a string"),
    (W4A16, "config_groups.group_0.input_activations", "none", r"input_activations must be an object"),
    (W4A16, "config_groups.group_0.output_activations", False, r"output_activations must be an object"),
    (W4A16, "config_groups", [], r"config_groups must be an object"),
    (W4A16, "ignore", "lm_head", r"quantization_config\.ignore must be a list"),
    (W4A16, "format", ["pack-quantized"], r"quantization_config\.format must be a string"),
    (W4A16, "format", "dense", r"quantization_config\.format is \"dense\": only pack-quantized, float-quantized"),
    (W4A16, "kv_cache_scheme", "none", r"kv_cache_scheme must be an object"),
    (W4A16, "sparsity_config", False, r"sparsity_config must be an object"),
    (W4A16, "quantization_status", 1, r"quantization_status must be a string"),
    (W4A16, "global_compression_ratio", "2", r"global_compression_ratio must be a number"),
    (FP8_DYNAMIC, f"{ACTS}.symmetric", "false", r"input_activations\.symmetric must be true or false"),
    (FP8_DYNAMIC, f"{ACTS}.dynamic", "true", r"input_activations\.dynamic is \"true\": not a known value"),
    (FP8_DYNAMIC, f"{ACTS}.num_bits", True, r"input_activations\.num_bits must be an integer"),
])
def test_each_field_has_its_json_kind(base, path, value, message):
    with pytest.raises(QuantConfigError, match=message) as info:
        QuantConfig.from_dict(_broken(base, path, value))
    assert isinstance(info.value, ConfigError) and str(info.value).startswith("quantization_config")


def test_what_compressed_tensors_may_write_is_still_read():
    """null for every optional field, actorder false / "weight", a JSON number ratio, observers."""
    cfg = _broken(W4A16, f"{WEIGHTS}.actorder", False)
    cfg = _broken(cfg, "global_compression_ratio", 1.5)
    cfg = _broken(cfg, f"{WEIGHTS}.observer", "minmax")
    cfg = _broken(cfg, f"{WEIGHTS}.observer_kwargs", {})
    for key in ("format", "ignore", "kv_cache_scheme", "sparsity_config", "transform_config", "version"):
        cfg = _broken(cfg, key, None)
    assert QuantConfig.from_dict(cfg).scheme_for("x.mlp.up_proj").group_size == 128
    assert QuantConfig.from_dict(_broken(W4A16, f"{WEIGHTS}.actorder", "weight")).kinds == {"w4a16"}


@pytest.mark.parametrize("path", ["ignore", "config_groups.group_0.targets"])
@pytest.mark.parametrize("target", ["re:(", "re:a{2,1}", "re:*x"])
def test_a_bad_regex_target_is_a_config_error_naming_it(path, target):
    needle = f'{path}: target "{target}" is not a valid regular expression'
    with pytest.raises(QuantConfigError, match=re.escape(needle)):
        QuantConfig.from_dict(_broken(W4A16, path, ["Linear", target]))


def test_config_errors_name_the_file(quantized, tmp_path):
    folder = _copy(quantized["w4a16"], tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = "false"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"{folder / 'config.json'}: quantization_config\.config_groups\.group_0"
                                          r"\.weights\.symmetric must be true or false"):
        _load(folder)


# -- the real command: unreadable shards and bad regex targets are user errors ----------------------

def _truncated(folder, dst, name, size):
    dst = _copy(folder, dst)
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[:size if size >= 0 else len(data) // 2])
    return dst


@pytest.fixture(scope="module")
def unreadable(tiny, quantized, tmp_path_factory):
    """{folder: what its error line names}: shards cut in half or to nothing, a bad regex target."""
    root = tmp_path_factory.mktemp("unreadable")
    bad_regex = _copy(quantized["fp8"], root / "regex")
    config = json.loads((bad_regex / "config.json").read_text())
    config["quantization_config"]["ignore"].append("re:(")
    (bad_regex / "config.json").write_text(json.dumps(config))
    return {
        _truncated(tiny, root / "dense_empty", CONSOLIDATED, 0): (CONSOLIDATED, "truncated"),
        _truncated(tiny, root / "dense_half", CONSOLIDATED, -1): (CONSOLIDATED, "truncated"),
        _truncated(quantized["w4a16"], root / "w4a16_half", "model.safetensors", -1): ("model.safetensors",
                                                                                       "truncated"),
        _truncated(quantized["fp8"], root / "fp8_empty", "model.safetensors", 0): ("model.safetensors", "truncated"),
        bad_regex: ("config.json", '"re:("', "not a valid regular expression"),
    }


def _generate(folder) -> list[str]:
    return ["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1", *RUN]


def test_unreadable_checkpoints_are_user_errors(unreadable, capsys):
    """Exit 2 and one `pixtral-fast: error:` line naming the file, never 'internal error' (exit 1)."""
    for folder, needles in unreadable.items():
        assert_one_error_line(run_main(_generate(folder), capsys), str(folder), *needles)


def test_the_console_entry_says_so_in_one_line(unreadable):
    """The real command, dense and quantized (one each of the cases above: a process start costs
    seconds), all at once."""
    names = ("dense_empty", "w4a16_half", "regex")
    procs = {folder: entry(*_generate(folder)) for folder in unreadable if folder.name in names}
    assert len(procs) == len(names)
    for folder, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and out == "", (folder.name, proc.returncode, err)
        assert len(err.splitlines()) == 1, err
        assert_one_error_line(err, str(folder), *unreadable[folder])


def test_quantizing_an_unreadable_hf_shard_is_a_user_error(tiny, tmp_path, capsys):
    from pixtral_fast.hf_export import convert_consolidated_to_hf

    hf = convert_consolidated_to_hf(tiny, tmp_path / "hf", processor=False)
    (shard,) = hf.glob("model*.safetensors")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = run_main(["quantize", str(hf), str(tmp_path / "q"), "--scheme", "fp8"], capsys)
    assert_one_error_line(err, str(shard), "truncated")
    assert not (tmp_path / "q").exists()  # nothing half-written is left behind
