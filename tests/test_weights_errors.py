"""Checkpoints refused before any tensor is read: wrong dtypes, wrong places, bad HF indexes, bad
devices and dtypes. Each error names what is wrong (the keys, the file, the argument)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pixtral_fast as pf
from pixtral_fast.config import ConfigError
from pixtral_fast.model.load import CheckpointNotFound, resolve_device
from pixtral_fast.tiny import make_tiny, write_hf_config
from pixtral_fast.weights import CONSOLIDATED, CheckpointError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def rewritten(src, dst, edit):
    dst.mkdir()
    state = load_file(str(src / CONSOLIDATED))
    edit(state)
    save_file(state, str(dst / CONSOLIDATED))
    (dst / "params.json").write_text((src / "params.json").read_text())
    return dst


@pytest.mark.parametrize("dtype, name", [(torch.int64, "I64"), (torch.int32, "I32"), (torch.int8, "I8"),
                                         (torch.uint8, "U8"), (torch.bool, "BOOL"),
                                         (torch.float8_e4m3fn, "F8_E4M3")])
def test_non_floating_weights_are_refused_by_name(tiny_dir, tmp_path, dtype, name):
    def edit(s):
        for key in ("norm.weight", "layers.0.attention.wq.weight"):
            s[key] = torch.ones(s[key].shape).to(dtype)

    bad = rewritten(tiny_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        pf.load_model(bad, device="cpu", progress=False)
    message = str(err.value)
    assert f"norm.weight ({name})" in message and f"layers.0.attention.wq.weight ({name})" in message
    assert "2 tensor(s)" in message and "floating" in message


def test_many_wrong_dtypes_are_counted_and_the_list_shortened(tiny_dir, tmp_path):
    def edit(s):
        for key in s:
            s[key] = torch.zeros(s[key].shape, dtype=torch.int16)

    bad = rewritten(tiny_dir, tmp_path / "bad", edit)
    n = len(load_file(str(tiny_dir / CONSOLIDATED)))
    with pytest.raises(CheckpointError, match=rf"{n} tensor\(s\).*and {n - 20} more"):
        pf.load_model(bad, device="cpu", progress=False)


def test_float_dtypes_all_load(tiny_dir, tmp_path):
    def edit(s):
        s["norm.weight"] = s["norm.weight"].double()
        s["output.weight"] = s["output.weight"].half()

    ok = rewritten(tiny_dir, tmp_path / "ok", edit)
    model = pf.load_model(ok, device="cpu", dtype=torch.float32, progress=False)
    assert model.norm.weight.dtype == torch.float32


def test_where_the_checkpoint_should_be(tmp_path, tiny_dir):
    for path, needle in ((tmp_path / "absent", "no such checkpoint folder"),
                         (tiny_dir / "params.json", "is a file, not a checkpoint folder"),
                         (tmp_path, "neither params.json")):
        with pytest.raises(CheckpointNotFound, match=needle) as err:
            pf.load_model(path, device="cpu", progress=False)
        assert isinstance(err.value, FileNotFoundError) and str(path) in str(err.value)


def test_params_json_without_weights(tmp_path, tiny_dir):
    (tmp_path / "params.json").write_text((tiny_dir / "params.json").read_text())
    with pytest.raises(CheckpointError, match="no model.*safetensors.*no consolidated.safetensors"):
        pf.load_model(tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("index", ["{", "[]", '{"weight_map": 3}', '{"weight_map": {"a": "../model.safetensors"}}',
                                   '{"weight_map": {"a": 7}}', '{"metadata": {}}'])
def test_a_bad_hf_index(tmp_path, index):
    write_hf_config(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a safetensors index"):
        pf.load_model(tmp_path, device="cpu", progress=False)


def test_hf_tensors_naming_one_weight_twice(tmp_path):
    write_hf_config(tmp_path)
    save_file({"lm_head.weight": torch.zeros(2), "language_model.lm_head.weight": torch.zeros(2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="name the same weight.*lm_head.weight"):
        pf.load_model(tmp_path, device="cpu", progress=False)


def test_a_file_that_is_not_safetensors(tmp_path, tiny_dir):
    (tmp_path / "params.json").write_text((tiny_dir / "params.json").read_text())
    (tmp_path / CONSOLIDATED).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{]]]]]]]")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        pf.load_model(tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("device, needle", [("gpu", "not a device"), ("", "not a device"), ("cuda:x", "not a device"),
                                            ("mps", "only 'cpu' and 'cuda'"), ("meta", "only 'cpu' and 'cuda'")])
def test_bad_devices_are_named_before_loading(tiny_dir, device, needle):
    with pytest.raises(ValueError, match=needle) as err:
        pf.load_model(tiny_dir, device=device, progress=False)
    assert repr(device) in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu(tiny_dir):
    with pytest.raises(ValueError, match="'cuda:7'.*CUDA is not available"):
        pf.load_model(tiny_dir, device="cuda:7", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_past_the_last_gpu():
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "bf16"])
def test_bad_model_dtype(tiny_dir, dtype):
    with pytest.raises(ValueError, match="dtype.*not supported"):
        pf.load_model(tiny_dir, device="cpu", dtype=dtype, progress=False)


def test_bad_params_json_in_a_checkpoint_names_file_and_field(tmp_path, tiny_dir):
    raw = json.loads((tiny_dir / "params.json").read_text()) | {"n_layers": 10**7}
    (tmp_path / "params.json").write_text(json.dumps(raw))
    (tmp_path / CONSOLIDATED).symlink_to(tiny_dir / CONSOLIDATED)
    with pytest.raises(ConfigError, match=r"params.json: n_layers = 10000000 is out of range \(must be >= 1 and <= 512\)"):
        pf.load_model(tmp_path, device="cpu", progress=False)
