"""The engine's lifecycle (close, the context manager, the end of every request, its health) and
the calls that ask every rank of its executor at once (prompt logits, weight bytes).

A mixin of Engine, on purpose and for Engine only: it is part of the Engine class, kept in a file
of its own so that engine.py holds the request path, and it shares Engine's private state (the
lock, the inbox of added requests, the closed flag: declared below). Nothing else may use that
state; every other module goes through Engine's public methods."""
from __future__ import annotations

from collections import deque
from threading import RLock
from typing import Self

import torch

from pixtral_fast.runtime.executor import Executor
from pixtral_fast.runtime.requests import image_tensors


class EngineLifecycle:
    _lock: RLock                    # Engine's: guards the scheduler, the cache and the runner
    _inbox: deque                   # Engine's: requests added, not yet queued
    _closed: str | None             # why the engine takes no more requests, once it does not
    executor: Executor              # Engine's: runs the steps

    def close(self) -> None:
        """Ends every unfinished request (finish_reason 'abort') and stops the executor (its
        tensor-parallel workers); the engine takes no more requests. Idempotent; `with Engine...
        as engine:` calls it."""
        with self._lock:
            if self._closed is None:
                self._end_all("abort", None)
                self._closed = "the engine is closed"
            self.executor.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> str | None:
        """Why the engine takes no more requests (closed, or its tensor-parallel ranks fell out
        of step), or None while it does."""
        return self._closed

    def health(self) -> str | None:
        """Why the engine cannot run a step, or None: its executor stopped (tensor-parallel ranks
        out of step), or a worker died since the last step (seen now, without running one). An
        engine closed on purpose is not unhealthy: see `closed`."""
        if self._closed is not None and self.executor.failure is None:
            return None
        return self.executor.health()

    @property
    def worker_pids(self) -> list[int]:
        """The spawned tensor-parallel workers' process ids (none without tensor parallelism)."""
        return self.executor.worker_pids

    def prompt_logits(self, tokens, images=()) -> torch.Tensor:
        """Float32 [seq, vocab] logits of one causal sequence (no cache, like model(tokens, images)),
        on the host; under tensor parallelism every rank runs its share."""
        tokens = torch.as_tensor(tokens)
        self.model.check_tokens(tokens)
        if tokens.numel() == 0:
            raise ValueError("tokens is empty")
        images = image_tensors(images)
        self.model.check_request(tokens.cpu().numpy(), images)
        with self._lock:
            self._check_open()
            return self._call("prompt_logits", tokens.cpu(), images)

    def weight_bytes(self) -> list[dict[str, int]]:
        """Each rank's weight bytes by part (decoder layers, embedding and output, the rest)."""
        with self._lock:
            self._check_open()
            return self._call("weight_bytes")

    def _check_open(self) -> None:
        if self._closed is not None:
            raise (self.executor.stopped_error if self.executor.failure else RuntimeError)(self._closed)

    def _end_all(self, reason: str, error: str | None) -> None:
        """Every request not yet finished ends now, its blocks freed."""
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if error is None:
                self.scheduler.finish(seq, reason)
            else:
                self.scheduler.fail(seq, error)

    def _stopped(self, message: str) -> None:
        """The executor stopped (its ranks fell out of step): no request can run any more."""
        self._closed = message
        self._end_all("error", message)
