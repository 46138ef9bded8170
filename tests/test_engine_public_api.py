"""What the server needs from the engine, as public attributes: the vocabulary size, the usage
snapshot, failing one request, why it is closed, the decode runner under its own name, whether the
AsyncEngine's thread runs; and the modules above the engine use these rather than its insides."""
import ast
import asyncio
from pathlib import Path

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.async_engine import AsyncEngine
from pixtral_fast.runtime.requests import EngineUsage
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded, Tokenizer

PACKAGE = Path(pf.__file__).parent
NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return model, Tokenizer.for_checkpoint(folder)


@pytest.fixture(scope="module")
def engine(tiny):
    return pf.Engine.from_model(*tiny, num_blocks=NUM_BLOCKS, block_size=16, progress=False)


def request(n: int = 20) -> Encoded:
    return Encoded(tokens=[1] + [1000 + i for i in range(n - 1)], images=[])


def test_vocab_size_and_the_decode_runner(engine):
    assert engine.vocab_size == engine.model.args.text.vocab_size
    assert engine.decode_runner is engine.executor.decode_runner
    assert not hasattr(engine, "runner")  # one name for the one DecodeRunner


def test_usage_counts_waiting_running_and_blocks(engine):
    empty = EngineUsage(running=0, waiting=0, used_blocks=0, total_blocks=NUM_BLOCKS - 1)
    assert engine.usage() == empty
    seqs = [engine.add_request(request(), pf.SamplingParams(max_new_tokens=50)) for _ in range(2)]
    assert engine.usage() == EngineUsage(0, 2, 0, NUM_BLOCKS - 1)  # added, not yet queued
    engine.step()
    usage = engine.usage()
    assert (usage.running, usage.waiting) == (2, 0) and usage.used_blocks == 2 * 2  # 21 tokens: 2 blocks each
    engine.abort(seqs[0])
    assert engine.usage() == EngineUsage(1, 0, 2, NUM_BLOCKS - 1)
    engine.abort(seqs[1])
    assert engine.usage() == empty


def test_fail_ends_one_request_with_its_message_and_frees_its_blocks(engine):
    seqs = [engine.add_request(request(), pf.SamplingParams(max_new_tokens=50)) for _ in range(2)]
    engine.step()
    engine.fail(seqs[0], "the client went away")
    assert (seqs[0].finish_reason, seqs[0].error) == ("error", "the client went away")
    assert engine.usage().running == 1 and engine.usage().used_blocks == 2
    engine.fail(seqs[0], "again")  # a finished request stays as it ended
    assert seqs[0].error == "the client went away"
    engine.abort(seqs[1])
    assert engine.usage().used_blocks == 0


def test_closed_says_why_the_engine_takes_no_more_requests(tiny):
    engine = pf.Engine.from_model(*tiny, num_blocks=NUM_BLOCKS, progress=False)
    assert engine.closed is None
    engine.close()
    assert engine.closed == "the engine is closed"
    with pytest.raises(RuntimeError, match="the engine is closed"):
        engine.add_request(request(), pf.SamplingParams())


def test_the_async_engine_says_whether_its_thread_runs(engine):
    ae = AsyncEngine(engine)
    assert not ae.thread_alive
    ae.start()
    try:
        assert ae.thread_alive
        result = asyncio.run(ae.generate(request(), pf.SamplingParams(max_new_tokens=3)))
        assert result.finish_reason == "length" and ae.snapshot["total_blocks"] == NUM_BLOCKS - 1
    finally:
        ae.shutdown()
    assert not ae.thread_alive and ae.snapshot["used_blocks"] == 0


def private_or_inner_uses(path: Path, names: set[str]) -> list[str]:
    """Attribute reads on an engine (a name or attribute called `engine`) of a private name or of
    `names` (the engine's insides), with their line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        base_name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        if base_name in ("engine", "async_engine") and (node.attr.startswith("_") or node.attr in names):
            found.append(f"{path.name}:{node.lineno}: {base_name}.{node.attr}")
    return found


@pytest.mark.parametrize("module", ["runtime/async_engine.py", "serve/metrics.py", "serve/chat.py",
                                    "serve/completions.py", "serve/app.py"])
def test_modules_above_the_engine_use_its_public_attributes_only(module):
    assert private_or_inner_uses(PACKAGE / module, {"scheduler", "blocks", "cache", "executor", "model"}) == []
