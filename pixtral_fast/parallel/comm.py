"""The process groups of a tensor-parallel model and the few collectives it uses.

Two groups: the data group (NCCL between GPUs, gloo on the CPU) carries the all-reduces and the
logits gather inside the model step, under a bounded timeout so that a dead or stuck rank ends in
an error rather than a hang; the control group (always gloo, on the host) carries the driver's
step messages, whose wait has no useful bound (an idle engine sends nothing for hours)."""
from __future__ import annotations

import datetime
import os
import pickle
import threading

import torch
import torch.distributed as dist

from pixtral_fast.parallel.plan import ShardPlan

DEFAULT_TIMEOUT_S = 120.0
# A step's message: a decode batch of 32 sequences of 1k tokens pickles to ~9 KB; 64 KiB keeps
# steps up to a few hundred such rows in one broadcast without moving much more than they need.
MESSAGE_BYTES = 64 << 10
IDLE_TIMEOUT = datetime.timedelta(days=365)


_in_use = False  # a tensor-parallel engine of this process holds the default group
joining: set = set()  # threads of abandoned start-ups still waiting out their rendezvous


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed or died: the engine cannot go on (its ranks are no longer in
    step) and has shut down."""


class Collectives:
    """This rank's view of the tensor-parallel group: `plan` (size, rank) plus the groups."""

    def __init__(self, plan: ShardPlan, data_group=None, control_group=None, owns_world: bool = False):
        self.plan = plan
        self.data_group, self.control_group = data_group, control_group
        self.owns_world = owns_world  # we made the default group (not torchrun's caller): ours to destroy
        self._message: torch.Tensor | None = None  # the step-message buffer (broadcast)

    @property
    def size(self) -> int:
        return self.plan.size

    @property
    def rank(self) -> int:
        return self.plan.rank

    def _needs_group(self) -> None:
        if self.data_group is None:
            raise RuntimeError(f"this model is rank {self.rank}'s shard of a {self.size}-way tensor-parallel "
                               "model built without a process group (for planning only): it cannot run")

    # -- inside the model step (data group) ---------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums the ranks' partial results, in place."""
        self._needs_group()
        dist.all_reduce(x, group=self.data_group)
        return x

    def gather_columns(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """Each rank's [..., n] block side by side, in rank order, cut to `width` columns."""
        self._needs_group()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.data_group)
        return torch.cat(parts, dim=-1)[..., :width]

    # -- between steps (control group, host objects) ------------------------------------------------

    def broadcast(self, obj=None):
        """The driver's object, on every rank (the driver passes it, the others receive it). One
        broadcast of a fixed MESSAGE_BYTES buffer (length + pickle) carries a step's message; only
        a larger one (a prefill with images, a huge batch) takes a second for the rest."""
        self._needs_group()
        head = MESSAGE_BYTES - 8
        if self._message is None:  # one buffer per rank, reused every step (the length says what is valid)
            self._message = torch.empty(MESSAGE_BYTES, dtype=torch.uint8)
        buf = self._message
        payload = b""
        if self.rank == 0:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            buf[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
            first = payload[:head]
            if first:
                buf[8:8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.control_group)
        n = int(buf[:8].view(torch.int64).item())
        if n > head:
            rest = torch.empty(n - head, dtype=torch.uint8)
            if self.rank == 0:
                rest.copy_(torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8))
            dist.broadcast(rest, src=0, group=self.control_group)
            if self.rank != 0:
                payload = buf[8:].numpy().tobytes() + rest.numpy().tobytes()
        elif self.rank != 0:
            payload = buf[8:8 + n].numpy().tobytes()
        return obj if self.rank == 0 else pickle.loads(payload)

    def gather(self, obj) -> list | None:
        """Every rank's object, in rank order, on the driver (None elsewhere)."""
        self._needs_group()
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.control_group)
        return out

    def min_int(self, value: int) -> int:
        self._needs_group()
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())

    def destroy(self) -> None:
        global _in_use
        try:
            if self.data_group is not None and dist.is_initialized():
                dist.destroy_process_group(None if self.owns_world else self.control_group)
        finally:  # a failed destroy must not leave the process unable to start another engine
            if self.data_group is not None:
                _in_use = False
            self.data_group = self.control_group = None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_free(spawning: bool) -> None:
    """RuntimeError unless this process can start a tensor-parallel engine: its ranks use
    torch.distributed's default group, of which a process has one."""
    if _in_use:
        raise RuntimeError("a tensor-parallel engine is already running in this process: close() it before "
                           "starting another (its ranks hold torch.distributed's one default process group)")
    if joining - {threading.current_thread()}:
        raise RuntimeError("a failed tensor-parallel start-up is still waiting out its rendezvous timeout in "
                           "this process; try again once it has")
    if spawning and dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process, so the engine cannot make "
                           "its own process group for the workers it would spawn: launch the script under "
                           "torchrun (the engine then joins that group) or destroy the group first")


def join_group(plan: ShardPlan, device: torch.device, init_method: str | None, timeout_s: float) -> Collectives:
    """Joins (or, under torchrun, reuses) the default process group and makes the control group.
    Every rank calls this in the same order."""
    global _in_use
    check_free(spawning=init_method is not None)
    timeout = datetime.timedelta(seconds=timeout_s)
    owns_world = not dist.is_initialized()
    if owns_world:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend_for(device), init_method=init_method, rank=plan.rank,
                                world_size=plan.size, timeout=timeout, **kwargs)
    try:
        if dist.get_world_size() != plan.size or dist.get_rank() != plan.rank:
            raise ValueError(f"the process group has world size {dist.get_world_size()} (this is rank "
                             f"{dist.get_rank()}), but tensor_parallel_size={plan.size} (rank {plan.rank}) was asked")
        # Made under the rendezvous timeout, so that a rank that died since the default group's
        # rendezvous fails this in bounded time; only then may its waits last (an idle engine).
        # (A torch without _set_pg_timeout makes it with the idle timeout at once.)
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        control = dist.new_group(backend="gloo", timeout=timeout if set_timeout else IDLE_TIMEOUT)
        if set_timeout is not None:
            set_timeout(IDLE_TIMEOUT, control)
    except BaseException:
        if owns_world and dist.is_initialized():
            dist.destroy_process_group()  # a half-made group of ours would refuse every later engine
        raise
    _in_use = True
    return Collectives(plan, dist.group.WORLD, control, owns_world)


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun (WORLD_SIZE set), else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as e:
        raise ValueError(f"WORLD_SIZE is set but RANK/LOCAL_RANK are not usable ({e}): launch with torchrun") from None
