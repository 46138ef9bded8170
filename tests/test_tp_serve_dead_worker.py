"""`pixtral-fast serve -tp 2` whose worker is killed (SIGKILL) while a request streams: the stream
ends with an error event naming the dead rank, /metrics stops reporting the sequences and blocks
the engine held before (running 0, used blocks 0) and says the engine is unhealthy
(pixtral_fast_engine_healthy 0), and later requests get a 503 naming the dead rank. A worker that
dies while the engine is idle is seen at once (TensorParallelExecutor.health), not at the next step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest

from pixtral_fast.runtime.tp_executor import TensorParallelExecutor
from pixtral_fast.tiny import make_tiny
from tests.support.serve_server import CPU_ARGS, ServerProcess, metric, user_message
from tests.test_tp_cli import children, running

BLOCKS = 64
MAX_TOKENS = 900  # far more decode steps than the test needs before it kills the worker


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp-dead-worker")
    tiny = make_tiny(folder / "tiny", seed=2)
    server = ServerProcess(["--model", str(tiny), *CPU_ARGS, "--tensor-parallel-size", "2",
                            "--num-gpu-blocks-override", str(BLOCKS), "--disable-uvicorn-access-log",
                            "--served-model-name", "tiny"], folder / "server.log")
    yield server
    server.terminate()


def gauges(url: str) -> dict[str, float]:
    return {name: metric(url, "pixtral_fast_" + name) for name in
            ("requests_running", "kv_cache_used_blocks", "kv_cache_total_blocks", "engine_healthy")}


def test_a_dead_worker_stops_the_gauges_and_says_which_rank(server):
    url = server.url
    (worker,) = [pid for pid, argv in children(server.proc.pid).items() if "pixtral_fast.runtime.tp_worker_main" in argv]
    body = {"model": "tiny", "messages": user_message("Tell me a long story."), "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True}
    events, killed_at = [], None
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line.removeprefix("data: ")))
            if len(events) == 4 and killed_at is None:  # the request is decoding: the engine holds its blocks
                before = gauges(url)
                assert before["requests_running"] == 1 and before["kv_cache_used_blocks"] >= 1
                assert before["engine_healthy"] == 1 and before["kv_cache_total_blocks"] == BLOCKS - 1
                os.kill(worker, signal.SIGKILL)
                killed_at = time.monotonic()
    assert killed_at is not None and not running(worker)
    error = events[-1].get("error")
    assert error is not None and f"worker rank 1 (pid {worker}) killed by SIGKILL" in error["message"], events[-1]
    assert error["code"] == "engine_unavailable", error
    deadline = time.monotonic() + 10
    after = gauges(url)
    while after["engine_healthy"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        after = gauges(url)
    assert after == {"requests_running": 0, "kv_cache_used_blocks": 0, "kv_cache_total_blocks": BLOCKS - 1,
                     "engine_healthy": 0}
    again = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"model": "tiny", "messages": user_message("Are you there?"), "max_tokens": 4})
    assert again.status_code == 503
    assert f"worker rank 1 (pid {worker}) killed by SIGKILL" in again.json()["error"]["message"]
    assert again.json()["error"]["code"] == "engine_unavailable"  # nothing is shutting down
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 503 and "worker rank 1" in health.json()["error"]["message"]


def test_a_worker_that_dies_while_the_engine_is_idle_is_seen_at_once():
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        driver = TensorParallelExecutor(SimpleNamespace(size=2), [worker])  # no group: health reads the processes only
        assert driver.health() is None
        worker.kill()
        worker.wait()
        assert driver.health() == f"tensor-parallel worker died: worker rank 1 (pid {worker.pid}) killed by SIGKILL"
        driver.failure = "tensor-parallel engine stopped: worker rank 1 died during the decode step"
        assert driver.health() == driver.failure
    finally:
        worker.kill()
        worker.wait()
