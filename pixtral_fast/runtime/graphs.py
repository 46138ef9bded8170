"""The decode step (embedding -> all layers over the paged cache -> logits -> sampling) run on
static buffers. On a GPU each batch-size bucket is captured once as a CUDA graph (largest first,
one memory pool) and replayed; larger batches run eagerly. On the CPU the same buffers and the
same step function run eagerly, so this code path is what the CPU tests exercise."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.model.text import AttentionMetadata
from pixtral_fast.runtime.kv_cache import SCRATCH_BLOCK, PagedKVCache
from pixtral_fast.runtime.sampling import sample

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


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


class StaticBuffers:
    """The device buffers the captured graphs read, with pinned host staging: one copy per dtype
    per step rather than one per field. The staging is rewritten only after the previous step's
    host read of next_tokens, so no copy from it can still be in flight."""
    FIELDS = {torch.int64: ("tokens", "slots", "top_k", "seed", "step"),
              torch.int32: ("positions", "seq_lens"),
              torch.float32: ("temperature", "top_p")}

    def __init__(self, max_batch: int, max_blocks: int, device):
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
        self.next_tokens = torch.zeros(max_batch, dtype=torch.int64, device=device)

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


class DecodeRunner:
    def __init__(self, model: Pixtral, cache: PagedKVCache, max_batch: int, max_blocks_per_seq: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, use_cuda_graphs: bool | None = None):
        self.model, self.cache = model, cache
        self.block_size = cache.shape.block_size
        self.buckets = tuple(sorted(b for b in buckets if b <= max_batch))
        self.max_batch = max_batch
        self.buffers = StaticBuffers(max_batch, max_blocks_per_seq, model.device)
        # The reference backend reads seq_lens on the host, which graph capture forbids.
        capturable = model.device.type == "cuda" and model.backend == "fast"
        self.use_cuda_graphs = capturable if use_cuda_graphs is None else use_cuda_graphs
        if self.use_cuda_graphs and not capturable:
            raise ValueError("CUDA graphs need the model on a CUDA device with backend='fast'")
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _run(self, bs: int, greedy_only: bool) -> None:
        b = self.buffers
        meta = AttentionMetadata(positions=b.positions[:bs], slot_mapping=b.slots[:bs],
                                 block_table=b.block_table[:bs], seq_lens=b.seq_lens[:bs], pages_checked=True)
        model = self.model
        h = model.decode_hidden(model.tok_embeddings(b.tokens[:bs]), meta, self.cache.layers)
        logits = model.logits(h)
        b.next_tokens[:bs] = sample(logits, b.temperature[:bs], b.top_k[:bs], b.top_p[:bs], b.seed[:bs],
                                    b.step[:bs], greedy_only=greedy_only)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    @torch.inference_mode()
    def capture(self, greedy_only: bool = True, progress: bool = True) -> None:
        """Captures every bucket, largest first so that smaller graphs reuse its memory pool."""
        if not self.use_cuda_graphs:
            return
        bar = tqdm(list(reversed(self.buckets)), desc="capturing decode graphs", unit="graph", disable=not progress)
        for bs in bar:
            self._capture_one(bs, greedy_only)

    def _capture_one(self, bs: int, greedy_only: bool) -> None:
        b = self.buffers
        b.slots[:bs].fill_(SCRATCH_BLOCK * self.block_size)
        b.block_table[:bs].fill_(SCRATCH_BLOCK)
        b.seq_lens[:bs].fill_(1)
        self._run(bs, greedy_only)  # warm-up: autotuning and lazy allocations happen outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._run(bs, greedy_only)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(bs, greedy_only)] = graph

    @torch.inference_mode()
    def step(self, rows: list[DecodeRow]) -> list[int]:
        """One decode step for these sequences; returns each one's next token."""
        n = len(rows)
        if n == 0:
            return []
        greedy_only = all(r.temperature == 0 for r in rows)
        bucket = self.bucket_for(n)
        padded = bucket or n  # padded eagerly too, so that the CPU runs the path the graphs take
        if n > self.max_batch:
            raise ValueError(f"{n} sequences exceed the runner's max_batch {self.max_batch}")
        graphed = self.use_cuda_graphs and bucket is not None
        if graphed and (padded, greedy_only) not in self.graphs:
            self._capture_one(padded, greedy_only)  # before fill(): capture runs on scratch rows
        self.buffers.fill(rows, padded, self.block_size)
        if graphed:
            self.graphs[(padded, greedy_only)].replay()
        else:
            self._run(padded, greedy_only)
        return self.buffers.next_tokens[:n].tolist()
