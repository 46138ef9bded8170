"""The tensor-parallel executor: rank 0 of a tensor-parallel engine. It starts the workers (spawn)
or joins torchrun's group, and has every rank run each ModelRunner call in step with its own: the
call's name and host inputs (tokens, positions, slots, block tables, sampling parameters, images)
go out in one broadcast, then each rank runs the same step, the model's all-reduces pairing the
ranks up inside it. The engine sees the Executor interface (runtime/executor.py) only.

A Ctrl-C during a call is held back until the call has ended on every rank (parallel/interrupts.py):
the engine then requeues the step's sequences and goes on, as without tensor parallelism; a second
Ctrl-C during the same call stops the engine.

The scheduler, the block manager and the tokenizer live on the driver only. Any failure during a
call (a dead worker, a collective that timed out, a fault on any rank) leaves the ranks out of step,
so it ends the engine: TensorParallelError naming the dead rank, every worker stopped."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pixtral_fast.model.load import check_dtype, check_tensor_parallel_split
from pixtral_fast.parallel.comm import (DEFAULT_TIMEOUT_S, Collectives, TensorParallelError, check_free, join_group,
                                        torchrun_rank)
from pixtral_fast.parallel import comm as comm_module
from pixtral_fast.parallel.interrupts import InterruptsHeldBack
from pixtral_fast.parallel.plan import ShardPlan, check_size
from pixtral_fast.runtime.config import EngineConfig
from pixtral_fast.runtime.executor import Executor
from pixtral_fast.runtime.model_runner import ModelRunner
from pixtral_fast.runtime.tp_worker import GATHERED, load_shard, serve_steps

log = logging.getLogger("pixtral_fast")
# Workers never get their current folder on sys.path (-P, Python 3.11+): a folder holding a
# `kernels/` (this repository's root, say) would shadow the `kernels` package transformers imports.
SAFE_PATH = ("-P",) if sys.version_info >= (3, 11) else ()
JOIN_GRACE_S = 10.0
WORKER_MODULE = "pixtral_fast.runtime.tp_worker_main"


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class TensorParallelExecutor(Executor):
    stopped_error = TensorParallelError

    def __init__(self, comm: Collectives, processes: list[subprocess.Popen], scratch: Path | None = None,
                 lifeline: int | None = None):
        self.comm, self.processes, self.scratch, self.lifeline = comm, processes, scratch, lifeline
        self.model, self.runner = None, None  # rank 0's model once loaded (start), its runner once set up
        self.failure: str | None = None
        self.closed = False
        self.backend = "nccl" if _is_nccl() else "gloo"
        if processes and self.backend == "nccl":
            threading.Thread(target=self._watch_nccl, name="pixtral-fast-tp-watch", daemon=True).start()

    def _watch_nccl(self) -> None:
        """NCCL waits for a dead peer until its timeout (and the watchdog then ends this process):
        aborting the group as soon as a worker dies fails the collective in flight instead, which
        the step in flight then reports as that worker's death. (gloo fails at once by itself.)"""
        while not self.closed:
            if any(p.poll() is not None for p in self.processes):
                if not self.closed:
                    log.error("a tensor-parallel worker died: %s; aborting the NCCL group", self._dead())
                    try:
                        dist.distributed_c10d._abort_process_group(self.comm.data_group)
                    except Exception as e:  # torch without the call: the collective's timeout ends it
                        log.error("could not abort the NCCL group (%s): the step waits for its timeout", e)
                return
            time.sleep(0.2)

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def describe(self) -> str:
        return f"tensor parallel {self.size} ({self.backend})"

    def health(self) -> str | None:
        """Why no step can run, or None: the failure that stopped the engine, a worker that has
        died since the last step (seen now, not at the next step), or a closed engine."""
        if self.failure is not None:
            return self.failure
        if self.closed:
            return "the tensor-parallel engine is closed"
        dead = self._dead()
        return f"tensor-parallel worker died: {dead}" if dead else None

    # -- calls ----------------------------------------------------------------------------------------

    def setup(self, config: EngineConfig) -> None:
        """Every rank's ModelRunner, built together (they agree on the cache's size)."""
        def run():
            self._send("setup", (config,))
            return ModelRunner(self.model, config, self.comm)

        self.runner = self._guarded("setup", run, passthrough=(ValueError,))

    def prefill(self, batch, stats, nvtx=False):
        return self._call("prefill", batch, stats=stats, nvtx=nvtx)

    def decode(self, rows):
        return self._call("decode", rows)

    def capture(self, greedy_only=True, logprobs=False, progress=False):
        self._call("capture", greedy_only, logprobs, progress=progress)

    def prompt_logits(self, tokens, images):
        return self._call("prompt_logits", tokens, images)

    def weight_bytes(self):
        return self._call("weight_bytes")

    def _call(self, name: str, *args, **local):
        """runner.name(*args) on every rank; the driver's result (or every rank's, in rank order,
        for the GATHERED calls). `local` keyword arguments stay on the driver."""
        runner = self._runner()

        def run():
            self._send(name, args)
            result = getattr(runner, name)(*args, **local)
            return self.comm.gather(result) if name in GATHERED else result

        return self._guarded(name, run)

    def _send(self, name: str, args: tuple) -> None:
        self.comm.broadcast((name, args))

    def _guarded(self, what: str, run, passthrough: tuple[type, ...] = ()):
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        if self.closed:
            raise TensorParallelError("the tensor-parallel engine is closed")
        dead = self._dead()
        if dead:
            self._fail(f"{dead} before the {what} step")
        held = InterruptsHeldBack()
        try:
            with held:  # a Ctrl-C waits for the call to end on every rank
                result = run()
        except BaseException as e:
            if isinstance(e, passthrough) or not isinstance(e, Exception):  # an interrupt stays one
                self.failure = f"tensor-parallel engine stopped: {type(e).__name__} during the {what} step"
                self.close()
                raise
            dead = self._dead(wait_s=2.0)  # a killed worker's exit code may take a moment to show
            cause = dead or f"rank 0 failed: {type(e).__name__}: {str(e)[:500]}"
            self._fail(f"{cause} during the {what} step", e)
        dead = self._dead()  # a rank that died mid-call may have left garbage (an aborted NCCL group)
        if dead:
            self._fail(f"{dead} during the {what} step")
        held.deliver()  # the ranks are in step: the engine requeues as without tensor parallelism
        return result

    def _dead(self, wait_s: float = 0.0) -> str:
        """Which workers have died, in words ('' if none)."""
        deadline = time.monotonic() + wait_s
        while wait_s and all(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
            time.sleep(0.02)
        return _gone(self.processes, self.scratch)

    def _fail(self, message: str, cause: BaseException | None = None):
        self.failure = f"tensor-parallel engine stopped: {message}"
        log.error("%s", self.failure)
        self.close()
        raise TensorParallelError(self.failure) from cause

    # -- shutdown -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops every worker (a stop message when the ranks are in step; otherwise, and for any
        still alive after the grace period, terminate then kill) and leaves the process group.
        Idempotent; also run at interpreter exit."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.failure is None:
                try:
                    self._send("stop", ())
                except Exception as e:  # a worker died meanwhile: it is stopped anyway
                    log.debug("stop message failed: %s", e)
            _stop_processes(self.processes, JOIN_GRACE_S if self.failure is None else 2.0)
        finally:  # even when interrupted (Ctrl-C during the grace period): nothing may outlive us
            for p in self.processes:
                if p.poll() is None:
                    p.kill()
                try:
                    p.wait(timeout=2.0)  # reaped: no zombie left behind
                except subprocess.TimeoutExpired:
                    pass
            try:
                self.comm.destroy()
            except Exception as e:
                log.debug("destroying the process group failed: %s", e)
            _release(self.scratch, self.lifeline)


def _wait_ready(processes: list[subprocess.Popen], scratch: Path, timeout_s: float) -> None:
    """Waits until every worker is about to join the group (its ready file), failing at once, with
    its error, for one that exits first (an import error, a bad environment): the rendezvous itself
    would only time out."""
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [r for r in range(1, len(processes) + 1) if not (scratch / f"ready-{r}").exists()]
        gone = _gone(processes, scratch)
        if gone:
            raise TensorParallelError(f"{gone} while starting (its log is above)")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TensorParallelError(f"worker rank(s) {waiting} did not start within {timeout_s:g} s")
        time.sleep(0.05)


def _join_watching(plan: ShardPlan, device: torch.device, init_method: str, timeout_s: float,
                   processes: list[subprocess.Popen], scratch: Path) -> Collectives:
    """join_group, while watching the workers: one that dies meanwhile fails the start-up at once
    (the rendezvous would wait for it until its timeout). The abandoned join then times out in its
    own thread, and until it has, check_free refuses a new engine."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the driver's thread too, not only the joining one
    outcome: dict[str, object] = {}

    abandoned = threading.Event()

    def join():
        try:
            outcome["comm"] = join_group(plan, device, init_method, timeout_s)
            if abandoned.is_set():  # formed just as the start-up gave up: nobody will use it
                outcome["comm"].destroy()
        except BaseException as e:  # noqa: BLE001 (handed to the starting thread)
            outcome["error"] = e
        finally:
            comm_module.joining.discard(thread)

    thread = threading.Thread(target=join, name="pixtral-fast-tp-join", daemon=True)
    comm_module.joining.add(thread)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.05)
        gone = _gone(processes, scratch)
        if gone and thread.is_alive():
            abandoned.set()
            raise TensorParallelError(f"{gone} while the ranks formed their process group (its log is above)")
    if "error" in outcome:
        e = outcome["error"]
        gone = _gone(processes, scratch)
        raise TensorParallelError(f"the {plan.size} ranks did not form a process group: "
                                  + (f"{gone} (its log is above)" if gone else f"{type(e).__name__}: {e}")) from e
    return outcome["comm"]


def _gone(processes: list[subprocess.Popen], scratch: Path | None) -> str:
    """The workers that have exited, in words, each with its own one-line error when it left one."""
    gone = []
    for r, p in enumerate(processes, start=1):
        if p.poll() is None:
            continue
        said = ""
        if scratch is not None and (scratch / f"error-{r}").is_file():
            said = ": " + (scratch / f"error-{r}").read_text(errors="replace").strip()
        gone.append(f"worker rank {r} (pid {p.pid}) {_describe_exit(p.returncode)}{said}")
    return "; ".join(gone)


def _stop_processes(processes: list[subprocess.Popen], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in processes:
        for stop in (p.terminate, p.kill):
            if p.poll() is None:
                stop()
                try:
                    p.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    pass


def _release(scratch: Path | None, lifeline: int | None) -> None:
    if lifeline is not None:
        try:
            os.close(lifeline)
        except OSError:
            pass
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def _is_nccl() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def parallel_devices(size: int, device) -> torch.device:
    """The driver's device; rank r runs on cuda:r (cuda:LOCAL_RANK under torchrun) or the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if parsed.index not in (None, 0):
            raise ValueError(f"device {device!r}: with tensor_parallel_size={size} rank r runs on cuda:r; "
                             "give device='cuda' (or 'cpu')")
        if not torch.cuda.is_available() or torch.cuda.device_count() < size:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"tensor_parallel_size={size} needs {size} CUDA devices; this machine has {count}")
        return torch.device("cuda", 0)
    if parsed.type != "cpu":
        raise ValueError(f"device {device!r}: only 'cpu' and 'cuda' devices are supported")
    return parsed


def start(path, size: int, device, dtype: torch.dtype, backend: str, progress: bool,
          timeout_s: float = DEFAULT_TIMEOUT_S):
    """The executor of a `size`-way engine, rank 0's shard loaded (its runners are built by
    setup): spawns size - 1 workers, or under torchrun joins its group (where ranks > 0 serve the
    driver here and exit when it closes)."""
    check_size(size)  # everything a rank would trip over, found before any process starts
    check_dtype(dtype)
    check_tensor_parallel_split(path, size)
    launched = torchrun_rank()
    check_free(spawning=launched is None)
    if launched is not None:
        return _join_torchrun(path, size, launched, device, dtype, backend, progress, timeout_s)
    device = parallel_devices(size, device)
    scratch = Path(tempfile.mkdtemp(prefix="pixtral-fast-tp-"))
    init_method = f"file://{scratch / 'rendezvous'}"
    watch_fd, lifeline = os.pipe()  # the workers read watch_fd; only this process holds lifeline
    processes: list[subprocess.Popen] = []
    driver = None
    try:
        for r in range(1, size):
            argv = [sys.executable, *SAFE_PATH, "-m", WORKER_MODULE, "--rank", str(r), "--size", str(size),
                    "--init-method", init_method, "--path", str(path), "--device-type", device.type,
                    "--dtype", str(dtype).removeprefix("torch."), "--backend", backend,
                    "--timeout-s", str(timeout_s), "--parent-fd", str(watch_fd), "--scratch", str(scratch)]
            processes.append(subprocess.Popen(argv, pass_fds=(watch_fd,)))
        os.close(watch_fd)
        watch_fd = None
        _wait_ready(processes, scratch, timeout_s)
        comm = _join_watching(ShardPlan(size, 0), device, init_method, timeout_s, processes, scratch)
        driver = TensorParallelExecutor(comm, processes, scratch, lifeline)
        driver.model = _load_driver_shard(driver, path, device, dtype, backend, progress)
        return driver
    except BaseException as e:
        if driver is not None:
            _stop_out_of_step(driver, e)
        else:
            for p in processes:
                p.kill()
                p.wait()
            if watch_fd is not None:
                os.close(watch_fd)
            _release(scratch, lifeline)
        raise


def _load_driver_shard(driver: TensorParallelExecutor, path, device, dtype, backend, progress):
    model, error, statuses = load_shard(path, device, dtype, backend, driver.comm, progress)
    if error is not None:
        raise error
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        raise TensorParallelError(f"worker rank {failed[0][0]} could not load its shard of {path}: {failed[0][1]}")
    return model


def _join_torchrun(path, size, launched, device, dtype, backend, progress, timeout_s):
    rank, world, local_rank = launched
    if world != size:
        raise ValueError(f"tensor_parallel_size={size} but torchrun started {world} processes (WORLD_SIZE): "
                         "launch as many as the model is split")
    want_cuda = (device is None and torch.cuda.is_available()) or torch.device(device or "cpu").type == "cuda"
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    comm = join_group(ShardPlan(size, rank), device, None, timeout_s)
    if rank != 0:
        model, _, _ = load_shard(path, device, dtype, backend, comm)
        if model is not None:
            serve_steps(model, comm)
        comm.destroy()
        raise SystemExit(0)  # this rank's work was the driver's engine; it ends with it
    driver = TensorParallelExecutor(comm, [])
    try:
        driver.model = _load_driver_shard(driver, path, device, dtype, backend, progress)
        return driver
    except BaseException as e:
        _stop_out_of_step(driver, e)
        raise


def _stop_out_of_step(driver: TensorParallelExecutor, error: BaseException) -> None:
    """Start-up failed. An ordinary exception was raised after every rank reported its load (the
    workers wait for a message: a stop reaches them); an interrupt may have come before the driver
    reported (the workers wait in that gather, where a stop message would never be read), so then
    they are killed (torchrun's ranks see this process's connections close)."""
    if not isinstance(error, Exception):
        driver.failure = f"start-up interrupted ({type(error).__name__})"
    driver.close()
