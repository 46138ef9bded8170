"""HF config.json fields that would change the model are refused, naming the file and the field,
never silently ignored; the values real Pixtral / Mistral-Small checkpoints carry still load."""
import copy
import json

import pytest

import pixtral_fast as pf
from pixtral_fast.config import ConfigError
from pixtral_fast.tiny import TINY_ARGS, hf_config


def _write(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def _yarn_parameters(tc):
    tc["rope_parameters"] = {"rope_type": "yarn", "rope_theta": tc.pop("rope_theta"), "factor": 4.0}


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "text_config.rope_scaling"),
    (lambda r: r["text_config"].update(rope_scaling={"type": "linear", "factor": 2.0}), "text_config.rope_scaling"),
    (lambda r: _yarn_parameters(r["text_config"]), "text_config.rope_parameters.rope_type"),
    (lambda r: _yarn_parameters(r["vision_config"]), "vision_config.rope_parameters.rope_type"),
    (lambda r: r["vision_config"].update(rope_scaling={"type": "linear", "factor": 2.0}), "vision_config.rope_scaling"),
    (lambda r: r.update(vision_feature_select_strategy="default"), "vision_feature_select_strategy"),
    (lambda r: r["text_config"].update(model_type="qwen2"), "text_config.model_type"),
    (lambda r: r["text_config"].update(model_type="llama"), "text_config.model_type"),
    (lambda r: r["vision_config"].update(model_type="siglip_vision_model"), "vision_config.model_type"),
])
def test_model_changing_fields_are_refused(tmp_path, edit, needle):
    raw = copy.deepcopy(hf_config(TINY_ARGS))
    edit(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        pf.ModelArgs.from_hf_config(path)
    assert str(path) in str(err.value) and needle in str(err.value), str(err.value)


@pytest.mark.parametrize("edit", [
    lambda r: r["text_config"].update(rope_scaling=None),
    lambda r: r["vision_config"].update(rope_scaling=None),
    lambda r: r["text_config"].update(rope_parameters={"rope_type": "default",
                                                       "rope_theta": r["text_config"].pop("rope_theta")}),
    lambda r: r["vision_config"].update(rope_parameters={"rope_type": "axial",
                                                         "rope_theta": r["vision_config"].pop("rope_theta")}),
    lambda r: r.pop("vision_feature_select_strategy"),
    lambda r: (r["text_config"].pop("model_type"), r["vision_config"].pop("model_type")),
])
def test_values_real_checkpoints_carry_still_load(tmp_path, edit):
    raw = copy.deepcopy(hf_config(TINY_ARGS))
    edit(raw)
    assert pf.ModelArgs.from_hf_config(_write(tmp_path, raw)) == TINY_ARGS
