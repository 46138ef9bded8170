"""The async engine (the server's core) over a tensor-parallel engine whose worker dies: the request
in flight gets the error, the engine thread stops (so /health turns 503), later requests are
refused as closed, and no KV block stays held."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from pixtral_fast.runtime.async_engine import AsyncEngine, EngineClosed, EngineFault
from pixtral_fast.runtime.engine import Engine
from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.tiny import make_tiny

MESSAGE = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine(tmp_path):
    engine = Engine.from_pretrained(make_tiny(tmp_path / "tiny"), tensor_parallel_size=2, device="cpu",
                                    dtype=torch.float32, backend="reference", num_blocks=64, progress=False)
    yield engine
    engine.close()


def test_a_dead_worker_fails_the_request_and_stops_the_async_engine(engine):
    async def scenario():
        async with AsyncEngine(engine) as ae:
            first = await ae.generate(MESSAGE, SamplingParams(max_new_tokens=4))
            assert len(first.tokens) == 4
            pid = engine.worker_pids[0]

            async def kill():
                await asyncio.sleep(0.5)
                os.kill(pid, signal.SIGKILL)

            killer = asyncio.create_task(kill())
            t0 = time.monotonic()
            with pytest.raises(EngineFault, match=rf"worker rank 1 \(pid {pid}\) killed by SIGKILL"):
                await ae.generate(MESSAGE, SamplingParams(max_new_tokens=100_000))
            assert time.monotonic() - t0 < 30
            await killer
            deadline = time.monotonic() + 10
            while ae.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not ae.alive
            with pytest.raises(EngineClosed, match="killed by SIGKILL"):
                await ae.generate(MESSAGE, SamplingParams(max_new_tokens=4))

    asyncio.run(scenario())
    assert engine.usage().used_blocks == 0
