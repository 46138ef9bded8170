"""`pixtral-fast bench --params P --random-weights` takes every family fixture and asks only for the
memory that model needs: a model whose weights cannot fit the device is refused before any weight
is made, with both figures."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixtral_fast import benchmark

FIXTURES = sorted(Path(__file__).parent.glob("fixtures/*/params.json"))


@pytest.mark.parametrize("params", FIXTURES, ids=lambda p: p.parent.name)
def test_bench_refuses_a_model_larger_than_the_device(params, monkeypatch):
    monkeypatch.setattr(benchmark, "free_bytes", lambda device: 10**9)  # a 1 GB device
    with pytest.raises(ValueError, match=r"weights need \d+\.\d GB in bfloat16 but cpu has 1\.0 GB free"):
        benchmark.run(params, batches=[1], image_size=1008, device="cpu", dtype=torch.bfloat16)


def test_fixtures_are_there():
    assert {p.parent.name for p in FIXTURES} >= {"mistral-small-3.1-2503", "mistral-small-3.2-2506", "pixtral-large-2411"}


def test_free_bytes_reads_the_host():
    assert 0 < benchmark.free_bytes(torch.device("cpu"))
