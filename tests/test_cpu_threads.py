"""A CPU engine's intra-op threads: chosen by EngineConfig.cpu_threads (as they are when None), said
by describe(); the server leaves one core to its HTTP side unless told otherwise."""
import argparse

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.config import EngineConfig
from pixtral_fast.serve import command
from pixtral_fast.tiny import make_tiny


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    return pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_cpu_threads_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="cpu_threads must be a positive integer or None"):
        EngineConfig(cpu_threads=bad)


def test_a_cpu_engine_runs_on_the_threads_it_was_given_and_says_so(model, restore_threads):
    torch.set_num_threads(2)
    engine = pf.Engine.from_model(model, num_blocks=8, progress=False, cpu_threads=1)
    assert torch.get_num_threads() == 1 and "cpu (1 threads)" in engine.describe()
    torch.set_num_threads(2)
    untouched = pf.Engine.from_model(model, num_blocks=8, progress=False)
    assert torch.get_num_threads() == 2 and "cpu (2 threads)" in untouched.describe()


def serve_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_serve_arguments(parser)
    return parser.parse_args(["--model", ".", *argv])


def test_the_server_leaves_a_core_to_its_http_side(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(command.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert command.engine_limits(serve_flags())["cpu_threads"] == 3
    assert command.engine_limits(serve_flags("--cpu-threads", "4"))["cpu_threads"] == 4
    monkeypatch.setattr(command.os, "sched_getaffinity", lambda pid: {0})
    assert command.engine_limits(serve_flags())["cpu_threads"] == 1  # one core: the engine still gets it
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice, read by torch at start, stands
    assert command.engine_limits(serve_flags())["cpu_threads"] is None


def test_the_encoder_cache_budget_flag():
    assert "encoder_cache_bytes" not in command.engine_limits(serve_flags())  # the engine's default
    assert command.engine_limits(serve_flags("--encoder-cache-memory", "256MiB"))["encoder_cache_bytes"] == 256 << 20
    assert command.engine_limits(serve_flags("--encoder-cache-memory", "0"))["encoder_cache_bytes"] == 0
