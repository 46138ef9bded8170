"""Ctrl-C at TP=2 is survivable as at TP=1: a SIGINT that lands while the driver's rank is inside
a step (between two all-reduces of the prefill or of a decode step) waits for the step to end on
every rank, then raises KeyboardInterrupt; the step's sequences go back to the queue with their
blocks freed and the same engine answers the next request exactly as before. A second SIGINT
during the same step stops the engine (the user would not wait). The engine's CPU KV cache, given
no size, is sized for its limits and its share of the host (pixtral_fast/cpu_memory.py), not 512 MiB
a rank.

One TP=2 engine for the whole module (each start costs seconds); the test that stops it runs last."""
from __future__ import annotations

import _thread
import signal

import pytest
import torch.distributed as dist

from pixtral_fast.cpu_memory import blocks_wanted, default_cpu_cache_bytes
from pixtral_fast.parallel import TensorParallelError
from pixtral_fast.tiny import make_tiny
from tests.support.engines import assert_clean
from tests.support.tp import CPU_FP32, chat, picture, worker_children

import pixtral_fast as pf

MAX_BATCH, MAX_MODEL_LEN = 4, 256
NEW_TOKENS = 6
OLD_DEFAULT_BYTES = 512 << 20  # what every rank took before, whatever the engine's limits


@pytest.fixture(scope="module", autouse=True)
def ctrl_c_raises():
    """Python's own SIGINT handler, as in an interactive session: pytest-xdist's workers ignore
    SIGINT (Ctrl-C goes to the controller), and an ignored SIGINT never reaches the engine."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tp-interrupts"), seed=3)
    eng = pf.Engine.from_pretrained(folder, tensor_parallel_size=2, max_batch_size=MAX_BATCH,
                                    max_model_len=MAX_MODEL_LEN, **CPU_FP32)  # no cache size: the default
    yield eng
    eng.close()


def request():
    return chat("Say something about this picture.", picture(32, 32, 9))


@pytest.fixture(scope="module")
def answer(engine):
    """The engine's greedy tokens before any interrupt."""
    return engine.generate(request(), max_new_tokens=NEW_TOKENS).tokens


def interrupt_inside(engine, monkeypatch, phase: str, after_reduces: int = 1) -> None:
    """A SIGINT (as Ctrl-C sends) the next time the driver's rank runs `phase` ('prefill' or
    'decode'), right after its `after_reduces`-th all-reduce: the workers are then inside the same
    step, waiting for the driver at the next collective."""
    runner = engine.executor.runner
    run, all_reduce = getattr(runner, phase), dist.all_reduce  # what every layer's reduce calls on this rank
    state = {"in_phase": False, "reduces": 0, "fired": False}

    def in_phase(*args, **kwargs):
        state["in_phase"] = True
        try:
            return run(*args, **kwargs)
        finally:
            state["in_phase"] = False

    def all_reduce_then_interrupt(*args, **kwargs):
        out = all_reduce(*args, **kwargs)
        if state["in_phase"] and not state["fired"]:
            state["reduces"] += 1
            if state["reduces"] == after_reduces:
                state["fired"] = True
                _thread.interrupt_main()  # the SIGINT handler runs at the driver's next bytecode
        return out

    monkeypatch.setattr(runner, phase, in_phase)
    monkeypatch.setattr(dist, "all_reduce", all_reduce_then_interrupt)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_ctrl_c_inside_a_step_keeps_the_tp_engine(engine, answer, monkeypatch, phase):
    pids = engine.worker_pids
    interrupt_inside(engine, monkeypatch, phase, after_reduces=2)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(request(), max_new_tokens=NEW_TOKENS)
    monkeypatch.undo()
    assert engine.executor.failure is None and engine.closed is None
    assert_clean(engine)  # the step's sequences were requeued, then aborted by generate: no block held
    assert engine.blocks.usage()["free_blocks"] == engine.blocks.usage()["total_blocks"]
    assert worker_children() == pids
    assert engine.generate(request(), max_new_tokens=NEW_TOKENS).tokens == answer
    assert_clean(engine)


def test_the_cpu_cache_default_fits_the_limits_and_the_host_share(engine):
    shape = engine.executor.runner.shape
    want = default_cpu_cache_bytes(shape.bytes_per_block, shape.block_size, MAX_BATCH, MAX_MODEL_LEN, tp_size=2)
    assert shape.num_blocks == want // shape.bytes_per_block
    # the limits ask for less than any cap here: MAX_BATCH sequences of MAX_MODEL_LEN and the scratch block
    assert shape.num_blocks == blocks_wanted(shape.block_size, MAX_BATCH, MAX_MODEL_LEN) == 4 * 16 + 1
    assert shape.num_blocks * shape.bytes_per_block < OLD_DEFAULT_BYTES // 100


def test_a_second_ctrl_c_inside_the_step_stops_the_engine(engine, answer, monkeypatch):
    """The documented way out of a step one does not want to wait for (this ends the module's engine)."""
    pids = engine.worker_pids
    runner, all_reduce, sent = engine.executor.runner, dist.all_reduce, []

    def all_reduce_then_interrupt(*args, **kwargs):
        out = all_reduce(*args, **kwargs)
        if len(sent) < 2:
            sent.append(1)
            _thread.interrupt_main()
        return out

    monkeypatch.setattr(dist, "all_reduce", all_reduce_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(request(), max_new_tokens=NEW_TOKENS)
    monkeypatch.undo()
    assert len(sent) == 2 and runner is engine.executor.runner
    assert engine.executor.failure == "tensor-parallel engine stopped: KeyboardInterrupt during the prefill step"
    assert_clean(engine)
    with pytest.raises(TensorParallelError, match="KeyboardInterrupt during the prefill step"):
        engine.generate(request(), max_new_tokens=NEW_TOKENS)
    assert all(pid not in worker_children() for pid in pids)
