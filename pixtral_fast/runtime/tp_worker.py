"""A tensor-parallel worker rank: loads its share of the model, then runs whatever step the driver
broadcasts, in step with it, until told to stop. Started by the driver as a fresh interpreter
(`python -m pixtral_fast.runtime.tp_worker_main`: unlike multiprocessing's spawn, it never re-runs
the user's script, so a script without a __main__ guard, a REPL or a notebook can start one), or by torchrun,
where every rank runs the user's script and Engine.from_pretrained turns ranks > 0 into this loop.

A worker that fails exits at once: its closed connections make the driver's next collective fail
(and the driver then names the dead rank), which beats a rank that lives on out of step."""
from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
from pathlib import Path

import torch

from pixtral_fast.model.load import load_model
from pixtral_fast.parallel.comm import Collectives, join_group
from pixtral_fast.parallel.plan import ShardPlan
from pixtral_fast.runtime.model_runner import ModelRunner

log = logging.getLogger("pixtral_fast")

# Calls whose per-rank results the driver gathers (the others' results stay on each rank).
GATHERED = frozenset({"weight_bytes"})


def load_shard(path, device: torch.device, dtype: torch.dtype, backend: str, comm: Collectives,
               progress: bool = False) -> tuple[object, Exception | None, list | None]:
    """(this rank's model or None, its load error, every rank's error text on the driver). Every
    rank reports, so the driver can raise the first failure instead of waiting on a missing rank."""
    try:
        model, error = load_model(path, device=device, dtype=dtype, backend=backend, progress=progress, comm=comm), None
    except Exception as e:
        model, error = None, e
    statuses = comm.gather(None if error is None else f"{type(error).__name__}: {error}")
    return model, error, statuses


def serve_steps(model, comm: Collectives) -> None:
    """The worker loop: (name, args) from the driver -> the same ModelRunner call as the driver's."""
    runner = None
    while True:
        name, args = comm.broadcast()
        if name == "stop":
            return
        if name == "setup":
            runner = ModelRunner(model, *args, comm=comm)
            continue
        result = getattr(runner, name)(*args)
        if name in GATHERED:
            comm.gather(result)


def _exit_with_parent(fd: int) -> None:
    """A killed driver cannot stop its workers: each holds the read end of a pipe whose only write
    end the driver holds, and leaves when reading it ends (the driver gone, however it went)."""
    def watch():
        while os.read(fd, 1):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="pixtral-fast-parent-watch", daemon=True).start()


def main(rank: int, size: int, init_method: str, path: str, device_type: str, dtype: torch.dtype, backend: str,
         timeout_s: float, parent_fd: int, scratch: str | None = None) -> None:
    """Entry point of a spawned worker process. In `scratch` (the driver's folder) it leaves
    ready-RANK once it is about to join the group, and error-RANK (one line) if it fails, so that
    the driver can tell a rank that died at start-up, and why, without waiting out the rendezvous."""
    _exit_with_parent(parent_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops us
    logging.basicConfig(format=f"pixtral-fast rank {rank}: %(message)s")
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    try:
        plan = ShardPlan(size, rank)
        if scratch is not None:  # last before the rendezvous: a failure before it is seen at once
            (Path(scratch) / f"ready-{rank}").touch()
        comm = join_group(plan, device, init_method, timeout_s)
        model, _, _ = load_shard(path, device, dtype, backend, comm)
        if model is not None:
            serve_steps(model, comm)
        comm.destroy()
    except BaseException as e:  # noqa: BLE001 (a worker ends here whatever happened; the driver names it)
        if not isinstance(e, KeyboardInterrupt):
            line = "".join(traceback.format_exception_only(e)).strip()
            log.error("worker failed: %s", line)
            log.debug("%s", traceback.format_exc())
            if scratch is not None:
                try:
                    (Path(scratch) / f"error-{rank}").write_text(line[:2000])
                except OSError:
                    pass
        os._exit(1)

