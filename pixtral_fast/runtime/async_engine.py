"""AsyncEngine: the Engine driven by one thread, used from asyncio.

One thread owns the engine (and the GPU): it takes commands (add, abort) from a thread-safe
queue, steps the engine while any sequence is unfinished, and after each step hands every
request its new tokens through `loop.call_soon_threadsafe` into that request's asyncio queue.
The event loop never waits on the engine. Tokenization and image decoding (CPU heavy) run in a
small thread pool. A request joins the running batch at the next step; an abort (a closed stream)
is carried out at the next step and frees the sequence's KV blocks. A request's text comes from
the engine's output processor (runtime/output.py), as offline: a stop string ends the sequence in
the step that completes it.

    async with AsyncEngine(engine) as ae:
        result = await ae.generate(messages, SamplingParams(max_new_tokens=64), stop=["\\n\\n"])
        async for delta in ae.stream(messages, SamplingParams(max_new_tokens=64)):
            print(delta.text, end="")
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mistral_common.exceptions import MistralCommonException

from pixtral_fast.parallel import TensorParallelError
from pixtral_fast.runtime.constraints import TokenConstraint
from pixtral_fast.runtime.engine import Engine, RequestError
from pixtral_fast.runtime.output import stop_strings
from pixtral_fast.runtime.requests import Completion, describe_failure
from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.runtime.scheduler import Sequence
from pixtral_fast.tokenizer import Encoded

log = logging.getLogger("pixtral_fast")


class QueueFull(RuntimeError):
    """The waiting queue holds max_waiting requests already: try again later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down (or its thread has stopped) and takes no new requests."""


class EngineFault(RuntimeError):
    """An internal failure, not caused by the request (the engine goes on serving others)."""


@dataclass
class Delta:
    """What a stream yields: new text (whole characters, stop strings held back and removed),
    the new token ids, their logprobs when asked, and on the last delta the finish reason
    ('stop' | 'length' | 'abort')."""
    text: str
    token_ids: list[int]
    logprobs: list[Any] = field(default_factory=list)   # TokenLogprobs per token id, when asked
    finish_reason: str | None = None


@dataclass
class _Update:                    # engine thread -> request, once per step with news
    tokens: list[int]
    logprobs: list[Any]
    finish_reason: str | None
    error: str | None


class _Handle:
    """One request as both sides see it. The engine thread owns seq/sent; the loop owns queue."""

    def __init__(self, request: Any, params: SamplingParams, stops: tuple[str, ...],
                 loop: asyncio.AbstractEventLoop, constraint: TokenConstraint | None = None):
        self.request, self.params, self.stops, self.loop = request, params, stops, loop
        self.constraint = constraint
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seq: Sequence | None = None
        self.sent = 0

    def post(self, item: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the request's event loop is closed: nobody listens any more
            return False


def _deliver(items: list[tuple[_Handle, _Update]]) -> None:
    for handle, update in items:
        handle.queue.put_nowait(update)


class RequestStream:
    """One submitted request: async-iterate for Deltas. Leaving early (break, cancel, close)
    aborts it; its KV blocks are freed at the engine's next step."""

    def __init__(self, owner: "AsyncEngine", handle: _Handle, prompt_tokens: int):
        self._owner, self._handle = owner, handle
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.stop_token_ids = handle.seq.params.stop_token_ids  # the engine's (EOS added when none were given)
        self._output = owner.engine.text_output(handle.seq)
        self._read = 0      # the output's pieces already delivered

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Delta:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        try:
            update: _Update = await self._handle.queue.get()
        except BaseException:
            self.abort()
            raise
        if update.error is not None:
            self.finish_reason = "error"
            raise EngineFault(update.error)
        self.token_ids += update.tokens
        try:  # a stop string was matched in the engine's step already: this takes the rest's text
            self._output.advance(self.token_ids, final=update.finish_reason is not None)
        except Exception as e:
            self.finish_reason = "error"
            self._owner._commands.put(("abort", self._handle))
            raise EngineFault(f"detokenization failed: {describe_failure(e)}") from e
        text, self._read = self._output.read(self._read)
        if update.finish_reason is not None:
            self.finish_reason = update.finish_reason
            self.stop_reason = self._output.stop_reason(update.finish_reason, self.token_ids)
        return Delta(text, update.tokens, update.logprobs, self.finish_reason)

    def abort(self) -> None:
        """Idempotent; safe from any thread."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
        self._owner._commands.put(("abort", self._handle))

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        if self.finish_reason in (None, "abort"):
            self.abort()


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int | None = None, encode_workers: int = 2):
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 (or None: no limit), got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(max_workers=encode_workers, thread_name_prefix="pixtral-encode")
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, _Handle] = {}
        self._lock = threading.Lock()
        self._pending = 0                      # submitted, not yet seen by the engine thread
        self._thread: threading.Thread | None = None
        self._closing = False
        self.fault: BaseException | None = None   # what stopped the engine thread, if anything
        self.snapshot = self._take_snapshot()

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pixtral-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def shutdown(self, grace: float = 0.0) -> None:
        """Takes no new requests, lets running ones finish for up to `grace` seconds, aborts the
        rest (freeing their blocks) and stops the engine thread. Blocking: from async code use
        `await aclose(grace)`."""
        self._closing = True
        deadline = time.monotonic() + grace
        while self.snapshot["unfinished"] and time.monotonic() < deadline and self.thread_alive:
            time.sleep(0.02)
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, grace))
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self, grace: float = 0.0) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown, grace)

    def __enter__(self) -> "AsyncEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    async def __aenter__(self) -> "AsyncEngine":
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    @property
    def thread_alive(self) -> bool:
        """The engine thread runs (while shutting down too, until it stops)."""
        return self._thread is not None and self._thread.is_alive()

    # -- requests (event loop side) ---------------------------------------------------------------

    async def run_in_pool(self, fn: Callable, *args) -> Any:
        """CPU-heavy work (image decoding, tokenization) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(self, messages: Any) -> Encoded:
        """Messages -> token ids + image tensors, in the pool. RequestError for bad input."""
        try:
            return await self.run_in_pool(self.engine.tokenizer.encode, messages)
        except (ValueError, MistralCommonException) as e:
            raise RequestError(str(e)) from None

    def num_waiting(self) -> int:
        """Requests that will still wait after the next step: those past the free batch slots.
        A request the next step admits (max_batch_size - running slots are free) does not count,
        so a burst of up to max_batch_size arrivals is never refused by max_waiting."""
        free_slots = max(0, self.engine.config.max_batch_size - self.snapshot["running"])
        return max(0, self._pending + self.snapshot["waiting"] - free_slots)

    async def submit(self, request: Any, params: SamplingParams, stop: str | list[str] | None = None,
                     constraint: TokenConstraint | None = None) -> RequestStream:
        """Queues a request (Encoded, or messages: encoded in the pool first) and waits until the
        engine thread has taken it. `stop`: one stop string or several, as Engine.generate's;
        `constraint`: this request's own, as Engine.add_request's (Engine.response_format_grammar).
        TypeError for params that are not SamplingParams, ValueError naming `stop` for stop strings
        out of bounds, RequestError if it cannot be served, QueueFull past max_waiting,
        EngineClosed while shutting down."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        stop = stop_strings(stop)
        if not self.alive:
            raise EngineClosed("the engine is shutting down" if self._closing else
                               "the engine is not running" + (f": {self.fault}" if self.fault is not None else ""))
        with self._lock:
            if self.max_waiting is not None and self.num_waiting() >= self.max_waiting:
                raise QueueFull(f"{self.num_waiting()} requests are waiting (max_waiting={self.max_waiting})")
            self._pending += 1
        try:
            if not isinstance(request, Encoded):
                request = await self.encode(request)
            handle = _Handle(request, params, stop, asyncio.get_running_loop(), constraint)
            self._commands.put(("add", handle))
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        try:
            accepted = await handle.queue.get()
        except BaseException:  # cancelled while queued: the abort follows the add in the queue
            self._commands.put(("abort", handle))
            raise
        if isinstance(accepted, BaseException):
            raise accepted
        return RequestStream(self, handle, accepted)

    async def stream(self, request: Any, params: SamplingParams,
                     stop: str | list[str] | None = None) -> AsyncIterator[Delta]:
        async with await self.submit(request, params, stop) as s:
            async for delta in s:
                yield delta

    async def generate(self, request: Any, params: SamplingParams, stop: str | list[str] | None = None) -> Completion:
        """The whole answer, as Engine.generate gives it."""
        text, logprobs = [], []
        async with await self.submit(request, params, stop) as s:
            async for delta in s:
                text.append(delta.text)
                logprobs += delta.logprobs
        return Completion("".join(text), s.token_ids, s.prompt_tokens, s.finish_reason,
                          stop_reason=s.stop_reason, logprobs=logprobs)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished()
                if not self._drain(block=idle):
                    break
                if self.engine.has_unfinished():
                    self._step()
                self.snapshot = self._take_snapshot()  # before the news: callers then see this state
                self._publish()
        except TensorParallelError as e:  # the engine stopped (the driver logged why): so does this thread
            self.fault = e
        except BaseException as e:  # the thread dies: say so to everyone waiting
            self.fault = e
            log.exception("engine thread stopped")
            raise
        finally:
            self._abandon_all("the engine stopped" if self.fault is None else f"the engine stopped: {self.fault}")

    def _drain(self, block: bool) -> bool:
        """Carries out queued commands; waits for one when idle. False on 'stop'."""
        while True:
            try:
                kind, handle = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                self._add(handle)
            elif kind == "abort" and handle.seq is not None and not handle.seq.finished:
                self.engine.abort(handle.seq)
            self.snapshot = self._take_snapshot()

    def _add(self, handle: _Handle) -> None:
        try:
            seq = self.engine.add_request(handle.request, handle.params, handle.stops, handle.constraint)
        except ValueError as e:
            handle.post(RequestError(str(e)))
            return
        except Exception as e:  # noqa: BLE001 - a fault, not the request's: reported as such
            log.exception("add_request failed")
            handle.post(EngineFault(f"{type(e).__name__}: {e}"))
            return
        if seq.finish_reason == "error":
            handle.post(RequestError(seq.error))
            return
        handle.seq = seq
        handle.request = None  # its images are the sequence's now
        self._active[seq.id] = handle
        self.snapshot = self._take_snapshot()  # before the caller hears back: it counts as waiting
        if not handle.post(len(seq.prompt)):
            self.engine.abort(seq)

    def _step(self) -> None:
        try:
            self.engine.step()
        except TensorParallelError:  # a rank died: the engine has stopped for good, and so does this thread
            self._publish()  # each request's error first (health then answers 503)
            raise
        except Exception as e:  # noqa: BLE001 - Engine.step keeps faults inside; if one escapes, fail its batch
            log.exception("engine step failed")
            for handle in list(self._active.values()):
                self.engine.fail(handle.seq, f"internal error: {type(e).__name__}: {e}")

    def _publish(self) -> None:
        """Every request's news of this step; one wake-up per event loop, not one per request."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Handle, _Update]]] = {}
        for seq_id, handle in list(self._active.items()):
            seq = handle.seq
            n = len(seq.generated)
            if n == handle.sent and not seq.finished:
                continue
            logprobs = list(seq.logprobs[handle.sent:n]) if seq.params.logprobs is not None else []
            error = seq.error if seq.finish_reason == "error" else None
            if error is not None and not error.startswith("internal error"):
                error = f"internal error: {error}"
            batches.setdefault(handle.loop, []).append(
                (handle, _Update(list(seq.generated[handle.sent:n]), logprobs, seq.finish_reason, error)))
            handle.sent = n
            if seq.finished:
                del self._active[seq_id]
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody listens to these any more
                for handle, _ in items:
                    if not handle.seq.finished:
                        self.engine.abort(handle.seq)

    def _abandon_all(self, message: str) -> None:
        for handle in list(self._active.values()):
            if handle.seq is not None and not handle.seq.finished:
                self.engine.abort(handle.seq)
            handle.post(_Update([], [], "abort", None))
        self._active.clear()
        while True:  # requests that never reached the engine
            try:
                kind, handle = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                handle.post(EngineClosed(message))

    def _take_snapshot(self) -> dict[str, int]:
        """What the metrics and the backpressure read, taken on the engine thread between steps.
        Waiting: sequences added and not in the running batch (queued, just added, or preempted)."""
        usage, stats = self.engine.usage(), self.engine.stats
        return {"used_blocks": usage.used_blocks, "total_blocks": usage.total_blocks, "running": usage.running,
                "waiting": usage.waiting, "unfinished": usage.running + usage.waiting + self._pending,
                "encoder_cache_hits": stats.encoder_cache_hits, "encoder_cache_misses": stats.encoder_cache_misses,
                "encoder_cache_evictions": stats.encoder_cache_evictions}
