"""SamplingParams validation, property-based over the input space: what is valid is kept (seeds
reduced to int64), everything else is refused with a ValueError naming the parameter."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pixtral_fast.runtime.sampling import MAX_LOGPROBS, MAX_TEMPERATURE, SamplingParams, reduce_seed

INT_FIELDS = ("max_new_tokens", "top_k", "seed", "logprobs")
FAST = settings(max_examples=60, deadline=None)

valid_params = st.fixed_dictionaries({
    "max_new_tokens": st.integers(1, 10**6),
    "temperature": st.floats(0.0, 100.0) | st.integers(0, 5),
    "top_p": st.floats(0.0, 1.0, exclude_min=True) | st.just(1),
    "top_k": st.integers(0, 131072),
    "seed": st.none() | st.integers(),
    "stop_token_ids": st.lists(st.integers(0, 131071), max_size=4).map(tuple) | st.lists(st.integers(0, 9), max_size=2),
    "logprobs": st.none() | st.integers(0, MAX_LOGPROBS),
})


@FAST
@given(valid_params)
def test_valid_params_are_kept(kw):
    p = SamplingParams(**kw)
    assert p.max_new_tokens == kw["max_new_tokens"] and p.top_k == kw["top_k"] and p.logprobs == kw["logprobs"]
    assert p.temperature == kw["temperature"] and isinstance(p.temperature, float)
    assert p.top_p == kw["top_p"] and isinstance(p.top_p, float)
    assert p.stop_token_ids == tuple(kw["stop_token_ids"])
    assert p.seed == (None if kw["seed"] is None else reduce_seed(kw["seed"]))
    assert p.greedy == (kw["temperature"] == 0)
    p.check_vocab(131072)
    assert dataclasses.replace(p) == p  # re-validating a valid value keeps it


@FAST
@given(st.integers())
def test_any_int_seed_reduces_to_int64_deterministically(seed):
    reduced = SamplingParams(seed=seed).seed
    assert -(2**63) <= reduced < 2**63
    assert (reduced - seed) % 2**64 == 0                # the same value modulo 2**64
    assert SamplingParams(seed=reduced).seed == reduced  # idempotent
    assert torch.tensor([reduced], dtype=torch.int64).item() == reduced
    if -(2**63) <= seed < 2**63:
        assert reduced == seed


def test_seed_reduction_examples():
    assert SamplingParams(seed=2**70).seed == 0
    assert SamplingParams(seed=2**64 + 5).seed == 5
    assert SamplingParams(seed=2**63).seed == -(2**63)
    assert SamplingParams(seed=-1).seed == -1


def not_an_int():
    return (st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=3)
            | st.just(torch.tensor(3)) | st.just([1]) | st.just(2.0))


@FAST
@given(st.sampled_from(INT_FIELDS), not_an_int())
def test_int_fields_refuse_bools_floats_and_other_types(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


@FAST
@given(st.sampled_from(("temperature", "top_p")),
       st.booleans() | st.sampled_from([math.nan, math.inf, -math.inf, 10**400]) | st.text(max_size=3) | st.none())
def test_float_fields_refuse_non_finite_and_non_numbers(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


@FAST
@given(st.data())
def test_out_of_range_values_name_their_parameter(data):
    name, bad = data.draw(st.sampled_from([
        ("max_new_tokens", st.integers(max_value=0)),
        ("temperature", st.floats(max_value=-1e-300)
         | st.floats(min_value=MAX_TEMPERATURE * 1.0001, allow_infinity=False)),
        ("top_p", st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True, allow_infinity=False)),
        ("top_k", st.integers(max_value=-1)),
        ("logprobs", st.integers(max_value=-1) | st.integers(min_value=MAX_LOGPROBS + 1)),
    ]))
    value = data.draw(bad)
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("stops", [3, "2", b"2", {2}, (2, True), (2, 3.0), ([2],)])
def test_stop_token_ids_must_be_a_sequence_of_ints(stops):
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=stops)


def refused_by_vocab(p: SamplingParams, vocab: int, name: str, bad: bool) -> None:
    if bad:
        with pytest.raises(ValueError, match=name):
            p.check_vocab(vocab)
    else:
        p.check_vocab(vocab)


@FAST
@given(st.integers(1, 1000), st.data())
def test_check_vocab_bounds_what_depends_on_the_model(vocab, data):
    top_k = data.draw(st.integers(0, 2 * vocab))
    refused_by_vocab(SamplingParams(top_k=top_k), vocab, "top_k", top_k > vocab)
    logprobs = data.draw(st.integers(0, MAX_LOGPROBS))
    refused_by_vocab(SamplingParams(logprobs=logprobs), vocab, "logprobs", logprobs > vocab)
    stop = data.draw(st.integers(-2 * vocab, 2 * vocab))
    if stop < 0:  # never a token id, whatever the model: refused at once
        with pytest.raises(ValueError, match="stop_token_ids"):
            SamplingParams(stop_token_ids=(0, stop))
    else:
        refused_by_vocab(SamplingParams(stop_token_ids=(0, stop)), vocab, "stop_token_ids", stop >= vocab)


def test_params_are_frozen_after_validation():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = -5


def test_numpy_integers_are_integers():
    import numpy as np

    p = SamplingParams(max_new_tokens=np.int64(5), top_k=np.int32(3), seed=np.uint64(2**64 - 1))
    assert (p.max_new_tokens, p.top_k, p.seed) == (5, 3, -1) and type(p.top_k) is int
