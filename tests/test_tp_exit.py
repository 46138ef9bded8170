"""Tensor-parallel workers never outlive their driver: not when the script ends without close(),
and not when the driver is killed outright (each worker holds the read end of a pipe only the
driver can write to, and leaves when it closes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pixtral_fast.tiny import make_tiny

START = """
import sys, torch
from pixtral_fast.runtime.engine import Engine
engine = Engine.from_pretrained(sys.argv[1], tensor_parallel_size=2, device="cpu", dtype=torch.float32,
                                backend="reference", num_blocks=16, progress=False)
print(*engine.worker_pids, flush=True)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tp_exit") / "tiny")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _start(code: str, checkpoint) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(checkpoint)], stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 1, f"expected one worker pid, got {line!r}"
    assert _alive(pids[0])
    return proc, pids


def test_workers_stop_when_the_script_ends_without_close(checkpoint):
    proc, pids = _start(START, checkpoint)
    assert proc.wait(timeout=60) == 0
    assert _wait_gone(pids, 10) == []


def test_workers_stop_when_the_driver_is_killed(checkpoint):
    proc, pids = _start(START + "import time\ntime.sleep(600)\n", checkpoint)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _wait_gone(pids, 10) == [], "a worker outlived its killed driver"
