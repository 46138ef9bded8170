"""The engine's step: one prefill of the newly admitted sequences and one decode step of every
running one, run through the executor, and what their sampled tokens do to each request.

A mixin of Engine, on purpose and for Engine only, as runtime/lifecycle.py is: engine.py holds the
request path (adding, generating, streaming), this file the step; they share Engine's private
state (declared below). Nothing else may use it.

Faults: a step never leaves the engine inconsistent. If a batched prefill or decode raises, each
of its sequences is run alone, so that a fault that follows one request ends only that request
(finish_reason "error", the exception in .error); the retry rewrites the same cache slots. A
KeyboardInterrupt / SystemExit puts every running sequence back in the queue (blocks freed; they
re-prefill later, as after a preemption) and is re-raised. A failure that stops the executor
(its ranks out of step) stops the engine: every request ends with it."""
from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from threading import RLock

import torch

from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.runtime.config import EngineConfig
from pixtral_fast.runtime.decode_step import DecodeRow
from pixtral_fast.runtime.executor import Executor
from pixtral_fast.runtime.kv_cache import BlockManager
from pixtral_fast.runtime.output import TextOutput
from pixtral_fast.runtime.prefill import PrefillBatch
from pixtral_fast.runtime.profiling import nvtx_range
from pixtral_fast.runtime.requests import EngineStats, describe_failure
from pixtral_fast.runtime.sampling import StepOutput
from pixtral_fast.runtime.scheduler import Scheduler, Sequence

log = logging.getLogger("pixtral_fast")


class EngineStep:
    model: Pixtral                  # Engine's, and the rest of its state the step reads and writes
    config: EngineConfig
    executor: Executor
    scheduler: Scheduler
    blocks: BlockManager
    stats: EngineStats
    max_model_len: int
    _lock: RLock
    _inbox: deque
    _outputs: weakref.WeakKeyDictionary[Sequence, TextOutput]

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_work() or any(not s.finished for s in self._inbox)

    @torch.inference_mode()
    def step(self) -> None:
        """One prefill of the newly admitted sequences and one decode step of all running ones.
        Thread-safe. No ordinary exception escapes (see the module docstring); a KeyboardInterrupt
        or SystemExit requeues the running sequences, blocks freed, and is re-raised. A failure that
        stops the executor (tensor-parallel ranks out of step: TensorParallelError) stops the
        engine: every request ends with that error and later calls raise it."""
        with self._lock:
            self._check_open()
            try:
                self._step()
            except Exception as e:
                if self.executor.failure is not None:  # it cannot run another step: the engine has stopped
                    self._stopped(self.executor.failure)
                    raise
                # outside the model calls: a bug; it ends this step's sequences, not the engine
                log.exception("engine step failed")
                victims = list(self.scheduler.running) or list(self.scheduler.waiting)[:1]  # progress, always
                for seq in victims:
                    self.scheduler.fail(seq, f"internal error in the engine step: {describe_failure(e)}")
            except BaseException:
                self.scheduler.requeue(list(self.scheduler.running))
                if self.executor.failure is not None:  # interrupted inside a call: its ranks are out of step
                    self._stopped(self.executor.failure)
                raise

    def _step(self) -> None:
        st, nvtx = self.stats, self.config.nvtx
        while self._inbox:  # peek, queue, pop: an interrupt in between loses no request
            self.scheduler.add(self._inbox[0])
            self._inbox.popleft()
        newcomers = self.scheduler.admit()
        if newcomers:
            t0 = time.perf_counter()
            st.prefill_tokens += sum(s.num_tokens for s in newcomers)
            st.prefill_images += sum(len(s.images) for s in newcomers)
            with nvtx_range("prefill", nvtx):
                self._run("prefill", newcomers, lambda group: self._prefill(group, nvtx))
            st.prefill_seconds += time.perf_counter() - t0
        rows = {}
        for seq in self.scheduler.reserve_decode():
            try:
                rows[seq] = self._decode_row(seq)
            except Exception as e:
                self.scheduler.fail(seq, f"decode failed: {describe_failure(e)}")
        running = [s for s in rows if not s.finished]
        if running:
            t0 = time.perf_counter()
            with nvtx_range("decode_step", nvtx):
                self._run("decode", running, lambda group: self._call("decode", [rows[s] for s in group]))
            st.decode_seconds += time.perf_counter() - t0
            st.decode_steps += 1
            st.decode_tokens += len(running)

    def _prefill(self, seqs: list[Sequence], nvtx: bool) -> StepOutput:
        vision = self.model.args.vision
        batch = PrefillBatch.from_sequences(seqs, self.blocks, None if vision is None else vision.image_token_id)
        return self._call("prefill", batch, stats=self.stats, nvtx=nvtx)

    def _run(self, phase: str, seqs: list[Sequence], compute: Callable[[list[Sequence]], StepOutput]) -> None:
        """compute(seqs) and records its tokens. If a batch raises, each sequence runs alone, so a
        fault that follows one request ends that request only; a sequence that fails alone ends
        with the exception as its error."""
        try:
            out = compute(seqs)
        except Exception as e:
            if self.executor.failure is not None:
                raise  # not this batch's fault, and no retry can run: the executor has stopped
            if len(seqs) == 1:
                log.warning("%s failed for request %d: %s", phase, seqs[0].id, describe_failure(e))
                self.scheduler.fail(seqs[0], f"{phase} failed: {describe_failure(e)}")
            else:
                log.warning("%s of %d sequences failed (%s); running each alone", phase, len(seqs),
                            describe_failure(e))
                for seq in seqs:
                    self._run(phase, [seq], compute)
            return
        self._record(seqs, out)

    def _decode_row(self, seq: Sequence) -> DecodeRow:
        position = seq.num_tokens - 1  # the newest token: generated, its K/V not yet cached
        slot = self.blocks.append(seq.id)
        p = seq.params
        return DecodeRow(token=seq.generated[-1], position=position, slot=slot, blocks=self.blocks.tables[seq.id],
                         temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=seq.seed,
                         step=len(seq.generated), logprobs=p.logprobs, allowed=seq.allowed_tokens())

    def _record(self, seqs: list[Sequence], out: StepOutput) -> None:
        for seq, token, finite, logprobs in zip(seqs, out.tokens, out.finite, out.logprobs):
            if seq.finished:
                continue
            if not finite:  # the sampled id is meaningless; say so rather than emit it
                self.scheduler.fail(seq, f"the model's logits were not finite (NaN/inf) at new token "
                                         f"{len(seq.generated)}, or were all equal (degenerate: a hidden state "
                                         "too large for its normalization comes out as zero, and so do the "
                                         "logits): its weights or activations overflowed")
                continue
            seq.generated.append(token)
            if seq.params.logprobs is not None:
                seq.logprobs.append(logprobs)
            if seq.constraint is not None and not self._advance_constraint(seq, token):
                continue
            reason = self._end_of(seq, token)
            if reason is not None and not seq.finished:
                self.scheduler.finish(seq, reason)

    def _advance_constraint(self, seq: Sequence, token: int) -> bool:
        """The request's constraint takes its new token; one that cannot ends the request alone."""
        try:
            seq.constraint.advance(token)
            return True
        except Exception as e:
            self.scheduler.fail(seq, f"the output constraint refused token {token}: {describe_failure(e)}")
            return False

    def _end_of(self, seq: Sequence, token: int) -> str | None:
        """Why the sequence ends with its new token, or None: a stop token or stop string ('stop'),
        its length. A stop string is matched here, in the step, so that its blocks free at once."""
        if token in seq.params.stop_token_ids:
            return "stop"
        output = self._outputs.get(seq)
        if output is not None and output.stops:
            try:
                output.advance(seq.generated)
            except Exception as e:
                self.scheduler.fail(seq, f"detokenization failed: {describe_failure(e)}")
                return None
            if output.stopped:
                return "stop"
        if len(seq.generated) >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
