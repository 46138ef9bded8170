"""Every params.json / config.json field is type- and range-checked: a bad value fails fast with a
ConfigError naming the file and the field, never a ZeroDivisionError, KeyError or TypeError, and
never a long build. The bad values are written from the format's meaning, not from the code."""
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import pixtral_fast as pf
from pixtral_fast.config import ConfigError, TextArgs, VisionArgs
from pixtral_fast.tiny import TINY_ARGS, hf_config

PARAMS = Path(__file__).parent / "data" / "params.json"
REAL_PARAMS = Path("/work/shared/pixtral-12b-2409/params.json")
# Mistral's SentencePiece v7 vocabulary (Pixtral-Large) holds [IMG_BREAK]/[IMG_END] at 14/15
SENTENCEPIECE_V7_VOCAB, SENTENCEPIECE_V7_MARKERS = 32768, (14, 15)

NOT_A_NUMBER = st.sampled_from([None, "64", "abc", [], {}, [64], {"value": 64}])
NOT_AN_INT = NOT_A_NUMBER | st.sampled_from([True, False, 1.5, 64.0, -0.5, float("nan"), float("inf")])
NOT_A_FLOAT = NOT_A_NUMBER | st.sampled_from([True, False, float("nan"), float("inf"), float("-inf")])
HUGE = st.integers(min_value=10**7, max_value=10**40)  # past any sane model size (10**7 layers, ...)


def positive_int():
    return NOT_AN_INT | st.integers(max_value=0) | HUGE


def positive_float():
    return NOT_A_FLOAT | st.floats(max_value=0.0, allow_nan=False) | st.sampled_from([-1, 0])


def token_id():
    return NOT_AN_INT | st.integers(max_value=-1) | st.integers(min_value=131072, max_value=10**12)


# field -> bad values, in params.json's names. Cross-field rules get values that break them with
# the real config's other fields (n_heads 32, dim 5120; vision hidden_size 1024, patch_size 16).
TEXT_BAD = {
    "dim": positive_int(), "n_layers": positive_int(), "hidden_dim": positive_int(),
    "head_dim": positive_int() | st.sampled_from([1, 3, 63, 127, 129]),  # RoPE needs an even head_dim
    "n_heads": positive_int() | st.sampled_from([7, 9, 12]),            # not a multiple of n_kv_heads 8
    "n_kv_heads": positive_int() | st.sampled_from([3, 5, 6, 7, 64]),   # does not divide n_heads 32
    "rope_theta": positive_float(), "vocab_size": positive_int() | st.sampled_from([5, 10, 13]),
    "norm_eps": positive_float() | st.floats(min_value=1.0, max_value=1e300),
    "max_seq_len": positive_int(),
}
VISION_BAD = {
    "hidden_size": positive_int() | st.sampled_from([1000, 1026]),       # not heads x multiple of 4
    "num_attention_heads": positive_int() | st.sampled_from([3, 5, 7, 512]),
    "num_hidden_layers": positive_int(), "intermediate_size": positive_int(),
    "image_size": positive_int() | st.sampled_from([1, 8, 15]),         # smaller than one patch
    "patch_size": positive_int() | st.sampled_from([2048, 4096]),
    "num_channels": NOT_AN_INT | st.integers().filter(lambda c: c != 3),
    "rope_theta": positive_float(),
    "image_token_id": token_id() | st.sampled_from([12, 13]),            # clashes with [IMG_BREAK]/[IMG_END]
    "image_break_token_id": token_id() | st.just(10),
    "image_end_token_id": token_id() | st.just(10),
    "adapter_bias": NOT_A_NUMBER | st.sampled_from([0, 1, "true"]),     # false is Mistral-Small-3.x / Pixtral-Large
    "spatial_merge_size": NOT_AN_INT | st.integers().filter(lambda s: s != 1),  # > 1 needs mm_projector_id
    "norm_eps": positive_float() | st.just(1.0),
}
BAD_FIELD = st.one_of(
    *[st.tuples(st.just(("",)), st.just(f), v) for f, v in TEXT_BAD.items()],
    *[st.tuples(st.just(("vision_encoder",)), st.just(f), v) for f, v in VISION_BAD.items()],
)


def write(tmp_path: Path, name: str, raw) -> Path:
    path = tmp_path / name
    if isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(raw) if not isinstance(raw, str) else raw)
    return path


def expect_config_error(path: Path, *needles: str, hf: bool = False) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        (pf.ModelArgs.from_hf_config if hf else pf.ModelArgs.from_params_json)(path)
    assert time.perf_counter() - t0 < 1.0, "a bad config must fail fast"
    message = str(err.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(BAD_FIELD)
def test_every_params_field_refuses_bad_values(tmp_path, case):
    (section,), field, value = case
    raw = json.loads(PARAMS.read_text())
    (raw[section] if section else raw)[field] = value
    name = f"{section}.{field}" if section else field
    expect_config_error(write(tmp_path, "params.json", raw), name)


@pytest.mark.parametrize("section, field", [("", f) for f in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads",
                                                                "n_kv_heads", "rope_theta", "norm_eps", "vocab_size")]
                         + [("vision_encoder", f) for f in ("hidden_size", "num_channels", "image_size",
                                                            "patch_size", "rope_theta", "intermediate_size",
                                                            "num_hidden_layers", "num_attention_heads")])
def test_every_required_field_is_named_when_missing(tmp_path, section, field):
    raw = json.loads(PARAMS.read_text())
    del (raw[section] if section else raw)[field]
    expect_config_error(write(tmp_path, "params.json", raw), "missing field", f"{section}.{field}" if section else field)


@pytest.mark.parametrize("content, needle", [
    ("[]", "JSON object"), ("3", "JSON object"), ('"params"', "JSON object"), ("null", "JSON object"),
    ("", "not valid JSON"), ("{", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),                 # nesting past the recursion limit
    ('{"dim": ' + "9" * 5000 + "}", "not valid JSON"),                 # past Python's int-from-text limit
])
def test_a_file_that_is_not_a_json_object(tmp_path, content, needle):
    expect_config_error(write(tmp_path, "params.json", content), needle)


def test_sections_of_the_wrong_type(tmp_path):
    raw = json.loads(PARAMS.read_text())
    expect_config_error(write(tmp_path, "params.json", raw | {"vision_encoder": [1, 2]}), "vision_encoder")
    raw["vision_encoder"]["add_pre_mm_projector_layer_norm"] = "yes"
    expect_config_error(write(tmp_path, "params.json", raw), "add_pre_mm_projector_layer_norm")


def test_no_file_and_a_huge_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        pf.ModelArgs.from_params_json(tmp_path)
    (tmp_path / "params.json").write_bytes(b" " * (2 << 20) + b"{}")
    expect_config_error(tmp_path / "params.json", "too large")


def test_a_vocabulary_without_the_image_tokens(tmp_path):
    raw = json.loads(PARAMS.read_text()) | {"vocab_size": 12}
    expect_config_error(write(tmp_path, "params.json", raw), "vision_encoder.image_break_token_id", "vocab_size")


@given(head_dim=st.integers(1, 512).map(lambda h: 2 * h), groups=st.sampled_from([1, 2, 4]),
       vision_head_dim=st.integers(1, 64).map(lambda h: 4 * h), vision_heads=st.integers(1, 16))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_even_head_dim_is_accepted(tmp_path, head_dim, groups, vision_head_dim, vision_heads):
    """The config takes what the reference path runs; the kernels pick their own fallbacks."""
    raw = json.loads(PARAMS.read_text()) | {"head_dim": head_dim, "n_heads": 8, "n_kv_heads": 8 // groups}
    raw["vision_encoder"] |= {"hidden_size": vision_head_dim * vision_heads, "num_attention_heads": vision_heads}
    args = pf.ModelArgs.from_params_json(write(tmp_path, "params.json", raw))
    assert (args.text.head_dim, args.vision.head_dim) == (head_dim, vision_head_dim)


def test_real_checkpoints_still_load():
    for path in (PARAMS, REAL_PARAMS) if REAL_PARAMS.is_file() else (PARAMS,):
        args = pf.ModelArgs.from_params_json(path)
        assert (args.text.n_layers, args.vision.num_hidden_layers, args.text.head_dim) == (40, 24, 128)
        assert isinstance(args.text.rope_theta, float) and args.text.rope_theta == 1e9


def test_integer_theta_is_a_float(tmp_path):
    raw = json.loads(PARAMS.read_text()) | {"rope_theta": 1000000000}
    args = pf.ModelArgs.from_params_json(write(tmp_path, "params.json", raw))
    assert type(args.text.rope_theta) is float and args.text.rope_theta == 1e9


@pytest.mark.parametrize("cls, kwargs, needle", [
    (TextArgs, dict(n_kv_heads=0), "n_kv_heads"),
    (TextArgs, dict(n_layers=10**7), "n_layers"),
    (TextArgs, dict(norm_eps=0.0), "norm_eps"),
    (VisionArgs, dict(num_attention_heads=0), "num_attention_heads"),
    (VisionArgs, dict(hidden_size="1024"), "hidden_size"),
])
def test_dataclasses_check_themselves(cls, kwargs, needle):
    base = {TextArgs: TINY_ARGS.text, VisionArgs: TINY_ARGS.vision}[cls]
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__} | kwargs
    with pytest.raises(ConfigError, match=needle):
        cls(**fields)


# -- HF config.json -------------------------------------------------------------------------------

HF_TEXT_BAD = {
    "hidden_size": positive_int(), "num_hidden_layers": positive_int(), "intermediate_size": positive_int(),
    "num_attention_heads": positive_int() | st.just(3), "num_key_value_heads": positive_int() | st.just(3),
    "head_dim": positive_int() | st.just(63), "rope_theta": positive_float(),
    "rms_norm_eps": positive_float(), "vocab_size": positive_int() | st.just(11),
    "max_position_embeddings": positive_int().filter(lambda v: not (isinstance(v, int) and v >= 10**7)),
}
HF_VISION_BAD = {
    "hidden_size": positive_int() | st.just(130), "num_hidden_layers": positive_int(),
    "intermediate_size": positive_int(), "num_attention_heads": positive_int() | st.just(3),
    "image_size": positive_int() | st.just(8), "patch_size": positive_int(), "rope_theta": positive_float(),
    "num_channels": NOT_AN_INT | st.just(1),
}
HF_TOP_BAD = {"image_token_index": token_id(), "multimodal_projector_bias": NOT_A_NUMBER | st.sampled_from([0])}
# HF writes null for "not set": these then take their documented defaults, which is not an error.
HF_UNSET_MEANS_DEFAULT = {"num_key_value_heads", "head_dim", "max_position_embeddings", "num_channels",
                          "image_token_index", "multimodal_projector_bias"}
HF_BAD_FIELD = st.one_of(
    *[st.tuples(st.just("text_config"), st.just(f), v) for f, v in HF_TEXT_BAD.items()],
    *[st.tuples(st.just("vision_config"), st.just(f), v) for f, v in HF_VISION_BAD.items()],
    *[st.tuples(st.just(""), st.just(f), v) for f, v in HF_TOP_BAD.items()],
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(HF_BAD_FIELD)
def test_every_hf_config_field_refuses_bad_values(tmp_path, case):
    section, field, value = case
    assume(not (value is None and field in HF_UNSET_MEANS_DEFAULT))
    raw = copy.deepcopy(hf_config(TINY_ARGS))
    if field == "num_attention_heads" and section == "text_config":
        del raw["text_config"]["head_dim"]  # so that the derived head_dim divides by it
    (raw[section] if section else raw)[field] = value
    if section == "vision_config" and field in ("hidden_size", "num_attention_heads"):
        del raw["vision_config"]["head_dim"]
    expect_config_error(write(tmp_path, "config.json", raw), f"{section}.{field}" if section else field, hf=True)


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.pop("text_config"), "text_config"),
    (lambda r: r.update(vision_config="pixtral"), "vision_config"),
    (lambda r: r["text_config"].pop("vocab_size"), "text_config.vocab_size"),
    (lambda r: r["text_config"].pop("rope_theta"), "text_config.rope_theta"),
    (lambda r: r["text_config"].update(rope_theta=None, rope_parameters=7), "text_config.rope_theta"),
    (lambda r: (r["text_config"].pop("rope_theta"), r["text_config"].update(rope_parameters=7)), "rope_theta"),
    (lambda r: (r["vision_config"].pop("rope_theta"), r["vision_config"].update(rope_parameters={})),
     "vision_config.rope_parameters.rope_theta"),
    (lambda r: r["text_config"].update(sliding_window=4096), "sliding_window"),
    (lambda r: r["vision_config"].update(model_type=["pixtral"]), "vision_config.model_type"),
    (lambda r: r["vision_config"].update(head_dim=32), "vision_config.head_dim"),
    (lambda r: r.update(vision_feature_layer="-1"), "vision_feature_layer"),
])
def test_hf_config_structure_errors(tmp_path, edit, needle):
    raw = copy.deepcopy(hf_config(TINY_ARGS))
    edit(raw)
    expect_config_error(write(tmp_path, "config.json", raw), needle, hf=True)


def test_hf_config_round_trip_and_defaults(tmp_path):
    assert pf.ModelArgs.from_hf_config(write(tmp_path, "config.json", hf_config(TINY_ARGS))) == TINY_ARGS
    raw = copy.deepcopy(hf_config(TINY_ARGS))
    del raw["text_config"]["head_dim"], raw["text_config"]["num_key_value_heads"]
    raw["text_config"]["rope_parameters"] = {"rope_theta": raw["text_config"].pop("rope_theta")}
    args = pf.ModelArgs.from_hf_config(write(tmp_path, "config.json", raw))
    assert (args.text.head_dim, args.text.n_kv_heads, args.text.rope_theta) == (16, 4, 1e9)
    assert math.isclose(args.text.norm_eps, 1e-5)


# -- anything at all: ConfigError or a model, never another exception ---------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=5)
    | st.sampled_from([0, 1, 2, 3, 4, 8, 16, 64, 128, 1024]),
    lambda inner: st.lists(inner, min_size=1, max_size=3) | st.dictionaries(st.text(max_size=5), inner, min_size=1,
                                                                           max_size=3),
    max_leaves=6)


def mutated(base: dict, data) -> dict:
    """base with a few of its (nested) fields replaced by arbitrary JSON values or removed."""
    raw = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 4))):
        sections = [raw] + [v for v in raw.values() if isinstance(v, dict)]
        section = data.draw(st.sampled_from(sections))
        if not section:
            continue
        key = data.draw(st.sampled_from(sorted(section)))
        if data.draw(st.booleans()):
            section[key] = data.draw(JSON_VALUES)
        else:
            del section[key]
    return raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), hf=st.booleans())
def test_arbitrary_edits_give_a_config_error_or_a_valid_model(tmp_path, data, hf):
    base = hf_config(TINY_ARGS) if hf else json.loads(PARAMS.read_text())
    path = write(tmp_path, "config.json" if hf else "params.json", mutated(base, data))
    try:
        args = (pf.ModelArgs.from_hf_config if hf else pf.ModelArgs.from_params_json)(path)
    except ConfigError as e:
        assert str(path) in str(e)
        return
    assert isinstance(args.text.n_layers, int) and 1 <= args.text.n_layers <= 512
    assert args.text.n_heads % args.text.n_kv_heads == 0 and math.isfinite(args.text.rope_theta)


@st.composite
def valid_args(draw):
    kv = draw(st.integers(1, 8))
    text = TextArgs(dim=draw(st.integers(1, 4096)), n_layers=draw(st.integers(1, 100)),
                    head_dim=2 * draw(st.integers(1, 256)), hidden_dim=draw(st.integers(1, 9999)),
                    n_heads=kv * draw(st.integers(1, 8)), n_kv_heads=kv,
                    rope_theta=draw(st.floats(1.0, 1e12)), norm_eps=draw(st.floats(1e-9, 0.5)),
                    vocab_size=draw(st.integers(64, 200_000)), max_seq_len=draw(st.integers(1, 2**20)))
    heads = draw(st.integers(1, 16))
    ids = draw(st.lists(st.integers(0, 63), min_size=3, max_size=3, unique=True))
    patch = draw(st.integers(1, 32))
    vision = VisionArgs(hidden_size=heads * 4 * draw(st.integers(1, 32)), num_channels=3,
                        image_size=patch * draw(st.integers(1, 100)), patch_size=patch,
                        rope_theta=draw(st.floats(1.0, 1e6)), intermediate_size=draw(st.integers(1, 9999)),
                        num_hidden_layers=draw(st.integers(1, 40)), num_attention_heads=heads,
                        image_token_id=ids[0], image_break_token_id=ids[1], image_end_token_id=ids[2],
                        norm_eps=draw(st.floats(1e-9, 0.5)))
    return pf.ModelArgs(text=text, vision=draw(st.sampled_from([vision, None])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_args())
@example(dataclasses.replace(TINY_ARGS, text=dataclasses.replace(TINY_ARGS.text, vocab_size=SENTENCEPIECE_V7_VOCAB)))
def test_params_json_round_trip_of_any_valid_model(tmp_path, args):
    path = write(tmp_path, "params.json", args.to_params_json())
    assert pf.ModelArgs.from_params_json(path) == args
    if args.vision is not None:  # HF's config has no fields for the break/end ids nor the vision eps
        # they come from the vocabulary the model was built for: Tekken's, or SentencePiece v7's
        marks = SENTENCEPIECE_V7_MARKERS if args.text.vocab_size == SENTENCEPIECE_V7_VOCAB else (12, 13)
        hf_args = dataclasses.replace(
            args, text=dataclasses.replace(args.text, max_seq_len=min(args.text.max_seq_len, 131072)),
            vision=dataclasses.replace(args.vision, image_token_id=10, image_break_token_id=marks[0],
                                       image_end_token_id=marks[1], norm_eps=1e-5))
        assert pf.ModelArgs.from_hf_config(write(tmp_path, "config.json", hf_config(hf_args))) == hf_args
