"""The engine tests' common set-up: the tiny checkpoint loaded in fp32 on the reference backend,
the default tokenizer, an engine with a small KV cache, and the check that an engine holds nothing.

model and tok are module-scoped fixtures: a test module imports them by name (each module then
builds its own, as a fixture defined there would)."""
from __future__ import annotations

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer


def load_tiny(folder):
    """A fresh fp32 reference-backend model from a tiny checkpoint folder."""
    return pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_tiny(tiny_dir)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def new_engine(model, tok, **limits):
    """An engine on model with 64 KV blocks and no progress bar, unless limits say otherwise."""
    return pf.Engine.from_model(model, tok, **({"num_blocks": 64, "progress": False} | limits))


def assert_clean(eng):
    """No KV block held, no block table, nothing waiting or running."""
    usage = eng.usage()
    assert (usage.used_blocks, usage.running, usage.waiting) == (0, 0, 0) and not eng.has_unfinished()
    assert not eng.blocks.tables  # no public view: a table left behind would leak its blocks later
