"""The decode step (embedding -> all layers over the paged cache -> logits -> sampling) run on
static buffers. On a GPU each batch-size bucket is captured once as a CUDA graph (largest first,
one memory pool) and replayed; larger batches run eagerly. On the CPU the same buffers and the
same step function run eagerly, so this code path is what the CPU tests exercise.

A graph is keyed by (bucket, greedy_only, logprobs, constrained): the greedy graph captured at
start does only the argmax and the finite flag; a step where some row samples, asks for logprobs,
or follows a grammar (an allowed-token bitmask) replays (and on first use captures) the variant
that does that work, so steps that ask for none pay nothing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.model.text import AttentionMetadata
from pixtral_fast.runtime.kv_cache import SCRATCH_BLOCK, PagedKVCache
from pixtral_fast.runtime.sampling import (StepOutput, bitmask_words, logprob_width, pack_with_logprobs, read_step,
                                           sample)

# vLLM's ladder: 1, 2, 4, then every 8 up to 512; a batch replays the smallest bucket that holds it.
DEFAULT_BUCKETS = (1, 2, 4) + tuple(range(8, 513, 8))


@dataclass
class DecodeRow:
    """One running sequence's input to a decode step."""
    token: int
    position: int          # of `token`; the sequence then holds position + 1 tokens
    slot: int              # flat cache slot where this token's K/V go
    blocks: list[int]      # the sequence's block table
    temperature: float
    top_k: int
    top_p: float
    seed: int
    step: int              # tokens generated so far (the noise counter)
    logprobs: int | None = None  # None: none; n: the chosen token's logprob and the n most likely
    allowed: np.ndarray | None = None  # a grammar's next tokens: int32 bitmask words (sampling.unpack_bitmask)


class StaticBuffers:
    """The device buffers the captured graphs read, with pinned host staging: one copy per dtype
    per step rather than one per field. The staging is rewritten only after the previous step's
    host read of the static outputs, so no copy from it can still be in flight."""
    FIELDS = {torch.int64: ("tokens", "slots", "top_k", "seed", "step"),
              torch.int32: ("positions", "seq_lens"),
              torch.float32: ("temperature", "top_p")}

    def __init__(self, max_batch: int, max_blocks: int, vocab: int, device):
        device = torch.device(device)
        pin = device.type == "cuda"
        self.groups = []
        for dtype, names in self.FIELDS.items():
            dev = torch.zeros(len(names), max_batch, dtype=dtype, device=device)
            self.groups.append((names, dev, torch.zeros(len(names), max_batch, dtype=dtype, pin_memory=pin)))
            for i, name in enumerate(names):
                setattr(self, name, dev[i])
        self.block_table = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self._table_host = torch.zeros(max_batch * max_blocks, dtype=torch.int32, pin_memory=pin)
        self._table_staging = torch.zeros(max_batch * max_blocks, dtype=torch.int32, device=device)
        # The static outputs, read on the host in one copy: tokens and finite flags (int64 [2, B]);
        # or, in a logprobs step, those with the logprobs (float64 [B, 3 + 2n], see pack_with_logprobs).
        self.plain = torch.zeros(2, max_batch, dtype=torch.int64, device=device)
        self.packed = torch.zeros(max_batch, 3 + 2 * logprob_width(vocab), dtype=torch.float64, device=device)
        # The allowed-token bitmasks of a constrained step (all bits set: a free row), staged on the host.
        self.allowed = torch.full((max_batch, bitmask_words(vocab)), -1, dtype=torch.int32, device=device)
        self._allowed_host = torch.full((max_batch, bitmask_words(vocab)), -1, dtype=torch.int32, pin_memory=pin)

    def fill(self, rows: list[DecodeRow], padded: int, block_size: int) -> None:
        """Copies rows in; rows past len(rows) up to `padded` point at the scratch block."""
        width = self.block_table.shape[1]
        used = max(len(r.blocks) for r in rows)
        if used > width:
            raise ValueError(f"a sequence holds {used} blocks but the decode runner was built for {width}")
        for i, r in enumerate(rows):
            if r.position >= len(r.blocks) * block_size:
                raise ValueError(f"row {i}: position {r.position} lies past its {len(r.blocks)} blocks")
        values = {"tokens": [r.token for r in rows], "slots": [r.slot for r in rows],
                  "top_k": [r.top_k for r in rows], "seed": [r.seed for r in rows], "step": [r.step for r in rows],
                  "positions": [r.position for r in rows], "seq_lens": [r.position + 1 for r in rows],
                  "temperature": [r.temperature for r in rows], "top_p": [r.top_p for r in rows]}
        pad = padded - len(rows)
        fillers = {"slots": SCRATCH_BLOCK * block_size, "seq_lens": 1, "top_p": 1.0}  # one scratch token
        for names, dev, host in self.groups:
            staged = host.numpy()
            for i, name in enumerate(names):
                staged[i, :padded] = values[name] + [fillers.get(name, 0)] * pad
            dev.copy_(host, non_blocking=True)
        table = self._table_host[: padded * used].numpy().reshape(padded, used)
        table.fill(SCRATCH_BLOCK)
        for i, r in enumerate(rows):
            table[i, : len(r.blocks)] = r.blocks
        staging = self._table_staging[: padded * used]
        staging.copy_(self._table_host[: padded * used], non_blocking=True)
        self.block_table[:padded, :used].copy_(staging.view(padded, used))
        if any(r.allowed is not None for r in rows):
            allowed = self._allowed_host[:padded].numpy()
            allowed.fill(-1)
            for i, r in enumerate(rows):
                if r.allowed is not None:
                    allowed[i] = r.allowed
            self.allowed[:padded].copy_(self._allowed_host[:padded], non_blocking=True)


GraphKey = tuple[int, bool, bool, bool]  # (bucket, greedy_only, logprobs, constrained)


def graph_buckets(buckets: tuple[int, ...], max_batch: int) -> tuple[int, ...]:
    """The buckets a runner captures: those below max_batch, and max_batch itself where a bucket
    reaches it (so that every batch up to max_batch replays a graph when the ladder covers it,
    without capturing sizes no batch can have)."""
    kept = sorted({b for b in buckets if 1 <= b < max_batch})
    return tuple(kept + [max_batch] if any(b >= max_batch for b in buckets) else kept)


class DecodeRunner:
    def __init__(self, model: Pixtral, cache: PagedKVCache, max_batch: int, max_blocks_per_seq: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, use_cuda_graphs: bool | None = None):
        self.model, self.cache = model, cache
        self.block_size = cache.shape.block_size
        self.buckets = graph_buckets(buckets, max_batch)
        self.max_batch = max_batch
        self.buffers = StaticBuffers(max_batch, max_blocks_per_seq, model.args.text.vocab_size, model.device)
        # The reference backend reads seq_lens on the host, which graph capture forbids.
        capturable = model.device.type == "cuda" and model.backend == "fast"
        self.use_cuda_graphs = capturable if use_cuda_graphs is None else use_cuda_graphs
        if self.use_cuda_graphs and not capturable:
            raise ValueError("CUDA graphs need the model on a CUDA device with backend='fast'")
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def run_body(self, key: GraphKey) -> None:
        """The step for the first bs rows of the buffers (what a graph of it replays); writes only
        the static outputs."""
        bs, greedy_only, logprobs, constrained = key
        b = self.buffers
        meta = AttentionMetadata(positions=b.positions[:bs], slot_mapping=b.slots[:bs],
                                 block_table=b.block_table[:bs], seq_lens=b.seq_lens[:bs], pages_checked=True)
        model = self.model
        h = model.run_decoder(model.tok_embeddings(b.tokens[:bs]), meta, self.cache.layers)
        logits = model.logits(h)
        tokens, finite = sample(logits, b.temperature[:bs], b.top_k[:bs], b.top_p[:bs], b.seed[:bs], b.step[:bs],
                                greedy_only=greedy_only, allowed=b.allowed[:bs] if constrained else None)
        if logprobs:
            b.packed[:bs] = pack_with_logprobs(logits, tokens, finite)
        else:
            b.plain[0, :bs] = tokens
            b.plain[1, :bs] = finite

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    @torch.inference_mode()
    def capture(self, greedy_only: bool = True, progress: bool = True, logprobs: bool = False) -> None:
        """Captures every bucket, largest first so that smaller graphs reuse its memory pool."""
        if not self.use_cuda_graphs:
            return
        bar = tqdm(list(reversed(self.buckets)), desc="capturing decode graphs", unit="graph", disable=not progress)
        for bs in bar:
            self._capture_one((bs, greedy_only, logprobs, False))

    def fill_scratch(self, bs: int) -> None:
        """bs rows of one token each, written to the scratch block: what a graph capture runs on."""
        b = self.buffers
        b.slots[:bs].fill_(SCRATCH_BLOCK * self.block_size)
        b.block_table[:bs].fill_(SCRATCH_BLOCK)
        b.seq_lens[:bs].fill_(1)

    def _capture_one(self, key: GraphKey) -> None:
        self.fill_scratch(key[0])
        self.run_body(key)  # warm-up: autotuning and lazy allocations happen outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.run_body(key)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = graph

    @torch.inference_mode()
    def step(self, rows: list[DecodeRow]) -> StepOutput:
        """One decode step for these sequences: each one's next token, whether its logits were
        finite, and its logprobs where it asked for them; one host read."""
        n = len(rows)
        if n == 0:
            return StepOutput([], [], [])
        if n > self.max_batch:
            raise ValueError(f"{n} sequences exceed the runner's max_batch {self.max_batch}")
        wanted = [r.logprobs for r in rows]
        bucket = self.bucket_for(n)
        padded = bucket or n  # padded eagerly too, so that the CPU runs the path the graphs take
        key = (padded, all(r.temperature == 0 for r in rows), any(w is not None for w in wanted),
               any(r.allowed is not None for r in rows))
        graphed = self.use_cuda_graphs and bucket is not None
        if graphed and key not in self.graphs:
            self._capture_one(key)  # before fill(): capture runs on scratch rows
        self.buffers.fill(rows, padded, self.block_size)
        if graphed:
            self.graphs[key].replay()
        else:
            self.run_body(key)
        b = self.buffers
        return read_step(b.packed[:n] if key[2] else b.plain[:, :n], wanted)
