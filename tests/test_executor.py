"""The engine runs every step through the Executor interface (runtime/executor.py), whatever the
number of ranks: an executor the engine has never seen, built on the interface alone, serves it
exactly like the default one, and the Engine (engine.py and its mixins) holds no branch on tensor
parallelism."""
import ast
import re
from pathlib import Path

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.config import EngineConfig
from pixtral_fast.runtime.executor import Executor, LocalExecutor
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded, Tokenizer

RUNTIME = Path(pf.__file__).parent / "runtime"
ENGINE_SOURCES = [RUNTIME / "engine.py", RUNTIME / "engine_step.py", RUNTIME / "lifecycle.py"]  # the Engine class
LIMITS = dict(num_blocks=32, block_size=16, progress=False)


class RecordingExecutor(Executor):
    """Runs every call on a LocalExecutor and records its name: the engine sees only the interface."""

    def __init__(self, model):
        self.inner, self.calls, self.closed = LocalExecutor(model), [], 0
        self.model, self.failure = model, None

    @property
    def runner(self):
        return self.inner.runner

    def _record(self, name, *args, **kwargs):
        self.calls.append(name)
        return getattr(self.inner, name)(*args, **kwargs)

    def setup(self, config):
        self._record("setup", config)

    def prefill(self, batch, stats, nvtx=False):
        return self._record("prefill", batch, stats, nvtx)

    def decode(self, rows):
        return self._record("decode", rows)

    def capture(self, greedy_only=True, logprobs=False, progress=False):
        self._record("capture", greedy_only, logprobs, progress)

    def prompt_logits(self, tokens, images):
        return self._record("prompt_logits", tokens, images)

    def weight_bytes(self):
        return self._record("weight_bytes")

    def describe(self):
        return "recorded"

    def health(self):
        return self.failure

    @property
    def worker_pids(self):
        return []

    def close(self):
        self.closed += 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return model, Tokenizer.for_checkpoint(folder)


def request() -> Encoded:
    return Encoded(tokens=[1] + [1000 + i for i in range(11)], images=[])


def test_an_executor_built_on_the_interface_serves_the_engine_like_the_local_one(tiny):
    model, tokenizer = tiny
    with pf.Engine.from_model(model, tokenizer, **LIMITS) as local:
        want = local.generate(request(), max_new_tokens=6, logprobs=2)
        want_logits = local.prompt_logits(request().tokens)
    executor = RecordingExecutor(model)
    engine = pf.Engine(model, tokenizer, EngineConfig(**LIMITS), executor=executor)
    got = engine.generate(request(), max_new_tokens=6, logprobs=2)
    assert (got.tokens, got.logprobs) == (want.tokens, want.logprobs)
    assert torch.equal(engine.prompt_logits(request().tokens), want_logits)
    assert engine.weight_bytes() == [executor.inner.runner.weight_bytes()]
    assert engine.describe().startswith("recorded, ")
    assert engine.decode_runner is executor.runner.decode_runner and engine.max_model_len == executor.runner.max_model_len
    assert executor.calls[:3] == ["setup", "capture", "prefill"] and executor.calls.count("decode") == 5
    engine.close()
    assert executor.closed >= 1 and engine.closed == "the engine is closed" and engine.health() is None


def test_an_executor_that_stops_ends_every_request_with_its_reason(tiny):
    model, tokenizer = tiny
    executor = RecordingExecutor(model)
    engine = pf.Engine(model, tokenizer, EngineConfig(**LIMITS), executor=executor)

    def ranks_out_of_step(rows):
        executor.failure = "ranks out of step"
        raise RuntimeError("a collective failed")

    executor.decode = ranks_out_of_step
    seq = engine.add_request(request(), pf.SamplingParams(max_new_tokens=4))
    with pytest.raises(RuntimeError, match="a collective failed"):
        engine.step()
    assert seq.finish_reason == "error" and seq.error == "ranks out of step"
    assert engine.closed == "ranks out of step" and engine.health() == "ranks out of step"
    assert engine.usage().running == 0 and engine.usage().used_blocks == 0
    with pytest.raises(RuntimeError, match="ranks out of step"):
        engine.generate(request(), max_new_tokens=2)


def test_a_failed_setup_closes_the_executor(tiny):
    model, tokenizer = tiny
    executor = RecordingExecutor(model)
    with pytest.raises(ValueError, match="max_model_len"):
        pf.Engine(model, tokenizer, EngineConfig(max_model_len=10 ** 9, **LIMITS), executor=executor)
    assert executor.closed == 1


@pytest.mark.parametrize("path", ENGINE_SOURCES, ids=lambda p: p.name)
def test_the_engine_has_no_branch_on_tensor_parallelism(path):
    """Every condition in the Engine's files, and every name they import, is free of tensor
    parallelism: the executor decides (the `tensor_parallel_size` argument is only passed on)."""
    source = path.read_text()
    tree = ast.parse(source)
    conditions = [ast.get_source_segment(source, node.test) for node in ast.walk(tree)
                  if isinstance(node, (ast.If, ast.IfExp, ast.While))]
    tensor_parallel = re.compile(r"parallel|\btp\b|\bcomm\b|\brank|\bworker|size == 1", re.IGNORECASE)
    assert len(conditions) >= 3 and [c for c in conditions if tensor_parallel.search(c)] == []
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names] + [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert [n for n in imported if "TensorParallel" in n or "tp_" in n or n.endswith(("driver", "worker"))] == []
