"""Continuous batching: which sequences prefill and which decode at each engine step.

Admission is FIFO within a per-step prefill budget, and waits while the KV cache lacks blocks for a
prompt; a prompt over the budget runs alone, after at most one step in which shorter requests behind
it go first (Scheduler.admit). Every step decodes every running sequence. A running sequence that
needs a new block when none is free preempts the most recently admitted one, whose blocks are freed
and which later re-prefills its prompt and what it generated so far (recompute, as vLLM does).
A request that could never fit fails alone, with a message; the others go on. One that grows to
fill the whole cache by itself ends with finish_reason "length", like one that hits max_model_len.
Not thread-safe by itself: the Engine calls it under its lock."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pixtral_fast.runtime.encoder_cache import image_key
from pixtral_fast.runtime.kv_cache import BlockManager

if TYPE_CHECKING:
    import numpy as np

    from pixtral_fast.runtime.constraints import TokenConstraint
    from pixtral_fast.runtime.sampling import SamplingParams, TokenLogprobs


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    images: list[torch.Tensor]
    params: SamplingParams
    seed: int                          # int64-safe: the sampling noise's counter key
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" | "length" | "error" | "abort"
    error: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per generated token, when asked for
    passed_over: bool = False          # shorter requests went first once (Scheduler.admit): never again
    constraint: TokenConstraint | None = None  # a grammar its tokens follow (runtime/constraints.py)
    _image_keys: list[bytes] | None = field(default=None, repr=False)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def num_tokens(self) -> int:
        """len(tokens), without building the list: the step asks it of every sequence."""
        return len(self.prompt) + len(self.generated)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def image_keys(self) -> list[bytes]:
        """Each image's content hash (runtime/encoder_cache.py), computed once."""
        if self._image_keys is None:
            self._image_keys = [image_key(image) for image in self.images]
        return self._image_keys

    def allowed_tokens(self) -> np.ndarray | None:
        """The next token's allowed set as bitmask words, None when unconstrained."""
        return None if self.constraint is None else self.constraint.allowed()

    def shares_prompt(self, other: Sequence) -> bool:
        """Same tokens (generated ones included) and the same images: one prefill serves both.
        Compared in place, cheapest first: admission asks this of every waiting pair."""
        return (self.prompt == other.prompt and self.generated == other.generated
                and len(self.images) == len(other.images)
                and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.images, other.images)))


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_prefill_tokens: int, max_model_len: int):
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0  # running sequences sent back to the queue for lack of cache

    def refusal(self, seq: Sequence) -> str | None:
        """Why this prompt can never run here, or None. Reads only fixed limits: safe without the lock."""
        n, capacity = len(seq.prompt), self.blocks.capacity_tokens
        if n == 0:
            return "the prompt is empty"
        if n >= self.max_model_len:
            return (f"the prompt has {n} tokens; max_model_len is {self.max_model_len} "
                    "(the prompt and at least one new token must fit)")
        if n + 1 > capacity:
            return (f"the prompt needs room for {n + 1} tokens but the whole KV cache holds {capacity}; "
                    "it can never run with this cache")
        return None

    def add(self, seq: Sequence) -> None:
        refusal = self.refusal(seq)
        if refusal is not None:
            self.fail(seq, refusal)
        elif not (seq.finished or seq in self.waiting or seq in self.running):  # aborted early, or queued already
            self.waiting.append(seq)

    def fail(self, seq: Sequence, message: str) -> None:
        seq.finish_reason, seq.error = "error", message
        self._release(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.id in self.blocks.tables:
            self.blocks.free(seq.id)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:  # finished before it ever started (an abort): it must never be admitted
            self.waiting.remove(seq)

    def requeue(self, seqs: list[Sequence]) -> None:
        """Back to the front of the queue, in order, blocks freed (they re-prefill what they hold,
        as a preempted sequence does): for a step interrupted through no fault of theirs."""
        for seq in reversed(seqs):
            if seq.finished or seq in self.waiting:
                continue
            if seq.id in self.blocks.tables:
                self.blocks.free(seq.id)
            if seq in self.running:
                self.running.remove(seq)
            self.waiting.appendleft(seq)

    def admit(self) -> list[Sequence]:
        """Waiting sequences that start now, while the batch and the cache allow, their prompts
        together within the prefill budget (max_prefill_tokens), in queue order, except that:
        - a sequence that does not fit what is left of the budget lets those behind it that fit go
          first, once: passed over a second time, it stops admission until it starts, so it is
          late by one step at most and a stream of short requests never starves it;
        - one longer than the whole budget (a long prompt, or one that grew before it was
          preempted) starts alone, in a step of its own, when nothing fits before it;
        - copies of a prompt starting in the step (a request's n choices) cost no budget: they
          start with it, and its prefill serves them all (prefill.PrefillBatch).
        Admission stops at the first sequence the cache has no blocks for: it waits for blocks in
        queue order. A short request queued behind long ones thus starts in the next step, and
        the running ones decode a token in every step, whatever the prefill."""
        admitted = self._admit_within_budget()
        if not admitted and self.waiting and self._can_start(self.waiting[0]):
            admitted = [self._start(self.waiting[0])]  # over the budget, alone
            admitted += self._start_copies(admitted[0])
        if self.waiting and not self.running:  # add() guarantees a lone sequence fits: never waits forever
            stuck = self.waiting[0]
            self.fail(stuck, f"internal error: {stuck.num_tokens} tokens cannot start in an empty cache")
        return admitted

    def _admit_within_budget(self) -> list[Sequence]:
        admitted, passed, budget = [], [], self.max_prefill_tokens
        for seq in list(self.waiting):
            n = 0 if any(seq.shares_prompt(a) for a in admitted) else seq.num_tokens  # a copy: prefilled once
            if n > budget:
                if seq.passed_over:  # its one pass is spent: nobody behind it goes first again
                    break
                passed.append(seq)
                continue
            if not self._can_start(seq):
                break
            admitted.append(self._start(seq))
            budget -= n
        if admitted:
            for seq in passed:
                seq.passed_over = True
        return admitted

    def _start_copies(self, seq: Sequence) -> list[Sequence]:
        """Waiting copies of seq's prompt that start with it (their prefill is seq's), while they fit."""
        copies = []
        for other in list(self.waiting):
            if other.shares_prompt(seq):
                if not self._can_start(other):
                    break
                copies.append(self._start(other))
        return copies

    def _can_start(self, seq: Sequence) -> bool:
        return len(self.running) < self.max_batch and self.blocks.can_allocate(seq.num_tokens)

    def _start(self, seq: Sequence) -> Sequence:
        self.waiting.remove(seq)
        self.blocks.allocate(seq.id, seq.num_tokens)
        self.running.append(seq)
        return seq

    def reserve_decode(self) -> list[Sequence]:
        """Makes sure every running sequence has room for one more token, preempting if needed."""
        while True:
            need = sum(self.blocks.needs_block(s.id) for s in self.running)
            if need <= len(self.blocks.free_blocks):
                return list(self.running)
            victim = self.running[-1]
            if len(self.running) == 1:  # it alone fills the cache: it ends, keeping its tokens
                self.finish(victim, "length")
                return []
            self.running.pop()
            self.blocks.free(victim.id)
            self.waiting.appendleft(victim)
            self.preemptions += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
