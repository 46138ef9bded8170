"""Each documented config bound, on both sides: the bound itself is accepted and the first value
past it refused with a ConfigError naming the field and the bound. The property tests in
tests/test_config_validation.py draw values at random and find an open bound (`<=` written `<`)
only now and then; these examples find it every run.

Also the model's vocabulary against its tokenizer's: smaller is refused at load naming both sizes,
equal or larger (padding rows) accepted."""
from __future__ import annotations

import json

import pytest

import pixtral_fast as pf
from pixtral_fast.config import MAX_CONFIG_BYTES
from pixtral_fast.tokenizer import Tokenizer
from pixtral_fast.weights import CheckpointError, check_tokenizer_vocab
from tests.test_config_validation import PARAMS, expect_config_error, write

TINY_POSITIVE = 5e-324               # the smallest float above 0
BELOW_ONE = 0.9999999999999999       # the largest float below 1
NO_VISION = object()

# (field as params.json names it, accepted, refused, the bound the message states, other fields set
# so that only this bound decides). Pixtral-12B's params.json is the base (n_heads 32, n_kv_heads 8;
# vision hidden_size 1024, 16 heads, patch 16, image 1024).
BOUNDS = [
    ("n_layers", [1, 512], [0, 513], ">= 1 and <= 512", {}),
    ("dim", [1, 65536], [0, 65537], ">= 1 and <= 65536", {}),
    ("hidden_dim", [1, 262144], [0, 262145], ">= 1 and <= 262144", {}),
    ("n_heads", [1024], [1025], ">= 1 and <= 1024", {}),
    ("n_heads", [1], [0], ">= 1 and <= 1024", {"n_kv_heads": 1}),
    ("n_kv_heads", [1, 1024], [0, 1025], ">= 1 and <= 1024", {"n_heads": 1024}),
    ("head_dim", [2, 1024], [1, 1025], ">= 2 and <= 1024", {}),
    ("vocab_size", [4194304], [4194305], ">= 1 and <= 4194304", {}),
    ("vocab_size", [1], [0], ">= 1 and <= 4194304", {"vision_encoder": NO_VISION}),
    ("max_seq_len", [1, 1048576], [0, 1048577], ">= 1 and <= 1048576", {}),
    ("rope_theta", [TINY_POSITIVE], [0, 0.0], "> 0", {}),
    ("norm_eps", [TINY_POSITIVE, BELOW_ONE], [0.0, 1.0, 1], "> 0 and < 1", {}),
    ("vision_encoder.image_size", [8192], [8193], ">= 1 and <= 8192", {}),
    ("vision_encoder.image_size", [1], [0], ">= 1 and <= 8192", {"vision_encoder.patch_size": 1}),
    ("vision_encoder.patch_size", [1, 8192], [0, 8193], ">= 1 and <= 8192", {"vision_encoder.image_size": 8192}),
    ("vision_encoder.hidden_size", [65536], [65537], ">= 1 and <= 65536", {"vision_encoder.num_attention_heads": 64}),
    ("vision_encoder.hidden_size", [4], [0], ">= 1 and <= 65536", {"vision_encoder.num_attention_heads": 1}),
    ("vision_encoder.intermediate_size", [1, 262144], [0, 262145], ">= 1 and <= 262144", {}),
    ("vision_encoder.num_hidden_layers", [1, 512], [0, 513], ">= 1 and <= 512", {}),
    ("vision_encoder.num_attention_heads", [1024], [1025], ">= 1 and <= 1024", {"vision_encoder.hidden_size": 4096}),
    ("vision_encoder.num_attention_heads", [1], [0], ">= 1 and <= 1024", {}),
    ("vision_encoder.spatial_merge_size", [1, 64], [0, 65], ">= 1 and <= 64",
     {"vision_encoder.mm_projector_id": "patch_merge"}),
    ("vision_encoder.num_channels", [3], [2, 4], "3", {}),
    ("vision_encoder.rope_theta", [TINY_POSITIVE], [0], "> 0", {}),
    ("vision_encoder.norm_eps", [TINY_POSITIVE, BELOW_ONE], [0.0, 1.0], "> 0 and < 1", {}),
    ("vision_encoder.image_token_id", [0, 4194303], [-1, 4194304], ">= 0 and <= 4194303", {"vocab_size": 4194304}),
    ("vision_encoder.image_break_token_id", [4194303], [4194304], ">= 0 and <= 4194303", {"vocab_size": 4194304}),
    ("vision_encoder.image_end_token_id", [4194303], [4194304], ">= 0 and <= 4194303", {"vocab_size": 4194304}),
]


def _params(edits: dict) -> dict:
    raw = json.loads(PARAMS.read_text())
    for name, value in edits.items():
        *section, field = name.split(".")
        node = raw[section[0]] if section else raw
        if value is NO_VISION:
            del node[field]
        else:
            node[field] = value
    return raw


def _cases(accepted: bool) -> list:
    return [pytest.param(field, value, bound, others, id=f"{field}={value!r}")
            for field, ok, bad, bound, others in BOUNDS for value in (ok if accepted else bad)]


@pytest.mark.parametrize("field,value,bound,others", _cases(accepted=True))
def test_the_bound_itself_is_accepted(tmp_path, field, value, bound, others):
    args = pf.ModelArgs.from_params_json(write(tmp_path, "params.json", _params(others | {field: value})))
    *section, name = field.split(".")
    assert getattr(args.vision if section else args.text, name) == value


@pytest.mark.parametrize("field,value,bound,others", _cases(accepted=False))
def test_the_first_value_past_the_bound_is_refused(tmp_path, field, value, bound, others):
    message = expect_config_error(write(tmp_path, "params.json", _params(others | {field: value})), field)
    assert "out of range" in message and f"(must be {bound})" in message, message


def test_the_vision_head_dim_bound(tmp_path):
    """hidden_size / num_attention_heads: 1024 is accepted, 1028 (the next multiple of 4) is not."""
    ok = _params({"vision_encoder.hidden_size": 1024, "vision_encoder.num_attention_heads": 1})
    assert pf.ModelArgs.from_params_json(write(tmp_path, "params.json", ok)).vision.head_dim == 1024
    bad = _params({"vision_encoder.hidden_size": 1028, "vision_encoder.num_attention_heads": 1})
    expect_config_error(write(tmp_path, "params.json", bad), "vision head_dim", "= 1028", "<= 1024")


def test_an_image_token_must_be_below_the_vocabulary_size(tmp_path):
    ok = _params({"vocab_size": 1000, "vision_encoder.image_token_id": 999})
    assert pf.ModelArgs.from_params_json(write(tmp_path, "params.json", ok)).vision.image_token_id == 999
    bad = _params({"vocab_size": 1000, "vision_encoder.image_token_id": 1000})
    expect_config_error(write(tmp_path, "params.json", bad), "vision_encoder.image_token_id (1000)", "vocab_size 1000")


def _padded(raw: dict, size: int) -> bytes:
    text = json.dumps(raw).encode()
    return text[:-1] + b" " * (size - len(text)) + b"}"


@pytest.mark.parametrize("name,read", [("params.json", pf.ModelArgs.from_params_json),
                                       ("config.json", pf.ModelArgs.from_hf_config)])
def test_a_config_file_of_exactly_the_size_limit_is_read(tmp_path, name, read):
    from pixtral_fast.tiny import hf_config

    raw = json.loads(PARAMS.read_text()) if name == "params.json" else hf_config()
    path = write(tmp_path, name, _padded(raw, MAX_CONFIG_BYTES))
    assert path.stat().st_size == MAX_CONFIG_BYTES == 1 << 20
    assert read(path).text.vocab_size == raw.get("vocab_size", raw.get("text_config", {}).get("vocab_size"))
    path.write_bytes(_padded(raw, MAX_CONFIG_BYTES + 1))
    expect_config_error(path, f"{MAX_CONFIG_BYTES + 1} bytes is too large", f"(limit {MAX_CONFIG_BYTES})",
                        hf=name == "config.json")


# -- the model's vocabulary against its tokenizer's ------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_words() -> int:
    return Tokenizer.default().tekken.n_words  # Pixtral-12B's Tekken: 131072


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_naming_both(tokenizer_words):
    with pytest.raises(CheckpointError, match=rf"vocab_size {tokenizer_words - 1}\) is smaller than its "
                                              rf"tokenizer's \({tokenizer_words} tokens\)"):
        check_tokenizer_vocab(tokenizer_words - 1, tokenizer_words)


def test_a_vocabulary_as_large_as_the_tokenizer_or_padded_past_it_is_accepted(tokenizer_words):
    for vocab_size in (tokenizer_words, tokenizer_words + 1, tokenizer_words + 128):
        check_tokenizer_vocab(vocab_size, tokenizer_words)
