"""A worker that fails while the engine starts is reported at once, with its own error, never
after the rendezvous timeout; no worker is left behind. The failure is injected into the worker
processes through a sitecustomize module on their PYTHONPATH (they are fresh interpreters, so no
monkeypatch reaches them), and each scenario's driver is a fresh interpreter too: an abandoned
rendezvous may linger in it for the timeout, which must not touch the other tests' engines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pixtral_fast.tiny import make_tiny

INJECT = textwrap.dedent("""
    import os, sys
    where = os.environ.get("PF_TEST_FAIL_WORKER")
    if where and "--rank" in sys.argv:
        import pixtral_fast.runtime.tp_worker as worker
        import pixtral_fast.parallel.comm as comm

        def fail(*args, **kwargs):
            raise MemoryError("injected: no memory for rank " + sys.argv[sys.argv.index("--rank") + 1])

        if where == "start":        # before the worker says it is ready
            worker.ShardPlan = fail
        elif where == "new_group":  # after the default group formed, inside join_group
            comm.dist.new_group = fail
""")
DRIVER = textwrap.dedent("""
    import json, os, sys, time, torch
    from pixtral_fast.parallel import comm
    from pixtral_fast.runtime.engine import Engine
    kw = dict(tensor_parallel_size=2, device="cpu", dtype=torch.float32, backend="reference", num_blocks=16,
              progress=False)
    out = {}
    t0 = time.monotonic()
    try:
        Engine.from_pretrained(sys.argv[1], **kw)
    except Exception as e:
        out["error"], out["type"] = str(e), type(e).__name__
    out["seconds"] = time.monotonic() - t0
    out["in_use"], out["joining"] = comm._in_use, bool(comm.joining)
    os.environ.pop("PF_TEST_FAIL_WORKER")  # the next engine's workers start clean
    try:
        with Engine.from_pretrained(sys.argv[1], **kw) as engine:
            out["next"] = engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=2).tokens
    except Exception as e:
        out["next_error"] = str(e)
    print(json.dumps(out), flush=True)
    os._exit(0)  # an abandoned rendezvous thread may still wait: it dies with this process
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tp_startup") / "tiny")


@pytest.mark.parametrize("where", ["start", "new_group"])
def test_a_worker_failing_at_start_up_is_named_at_once(checkpoint, tmp_path, where):
    (tmp_path / "sitecustomize.py").write_text(INJECT)
    env = dict(os.environ, PF_TEST_FAIL_WORKER=where,
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(checkpoint)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] == "TensorParallelError"
    assert "worker rank 1 (pid" in out["error"] and "exited with code 1: MemoryError: injected: no memory for rank 1" \
        in out["error"], out["error"]
    assert out["seconds"] < 30, out  # far below the 120 s rendezvous timeout
    assert not out["in_use"]
    if where == "start":  # nothing joined: the next engine starts at once
        assert not out["joining"] and len(out["next"]) == 2, out
    else:  # the default group had formed: the driver's half of the new group waits for the dead rank
        # in its own thread until the rendezvous timeout; meanwhile a new engine is refused, clearly
        assert out["joining"] and "still waiting out its rendezvous timeout" in out["next_error"], out
