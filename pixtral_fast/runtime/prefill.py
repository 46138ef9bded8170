"""Prefill of newly admitted sequences: their images through one packed ViT pass, their tokens
(the prompt, plus whatever they generated before a preemption) through one varlen causal pass that
fills the paged cache, then each one's next token. Copies of one prompt (a request's n choices)
run once: the copies' cache blocks are copied, and each samples the same logits with its seed."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.model.text import AttentionMetadata
from pixtral_fast.runtime.encoder_cache import EncoderCache, encode_images
from pixtral_fast.runtime.kv_cache import BlockManager, PagedKVCache
from pixtral_fast.runtime.profiling import nvtx_range
from pixtral_fast.runtime.requests import EngineStats
from pixtral_fast.runtime.sampling import SamplingParams, StepOutput, sample_rows
from pixtral_fast.runtime.scheduler import Sequence


def image_rows(seqs: list[Sequence], image_token_id: int) -> list[int]:
    """Rows of the packed batch that take image features: the [IMG] tokens of each prompt, in
    order. An [IMG] the model generated (re-prefilled after a preemption) is an ordinary token and
    keeps its embedding, as it had when it was decoded."""
    rows, start = [], 0
    for seq in seqs:
        rows += [start + i for i, t in enumerate(seq.prompt) if t == image_token_id]
        start += seq.num_tokens
    return rows


def prompt_sources(seqs: list[Sequence]) -> list[int]:
    """For each sequence, the index of the first one in `seqs` with the same tokens and images
    (itself if none): copies of one prompt (a request's n choices) are prefilled once."""
    sources: list[int] = []
    for i, seq in enumerate(seqs):
        sources.append(next((j for j in range(i) if sources[j] == j and seq.shares_prompt(seqs[j])), i))
    return sources


@dataclass
class PrefillBatch:
    """Everything one prefill step computes from, as host values: what a tensor-parallel driver
    sends its workers so that every rank runs the same step. Only distinct prompts are packed; a
    copy of one (same tokens and images) gets its cache blocks copied and its own sample of the
    same logits row."""
    tokens: list[int]            # every distinct prompt's tokens, packed back to back
    lengths: list[int]
    slots: list[int]             # the cache slot of each token
    images: list[torch.Tensor]
    image_rows: list[int]        # rows of `tokens` that take image features, in order
    params: list[SamplingParams]  # these and below: one per sequence, copies included
    seeds: list[int]
    steps: list[int]             # tokens each sequence generated so far (its noise counter)
    logit_rows: list[int]        # each sequence's packed prompt (index into lengths)
    block_copies: list[tuple[list[int], list[int]]]  # (from, to) block lists, once the prompts are cached
    allowed: list[np.ndarray | None] | None = None  # per sequence: its grammar's next tokens (bitmask words)
    image_keys: list[bytes] | None = None  # each image's content hash (the encoder cache's key)

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], blocks: BlockManager, image_token_id: int | None) -> "PrefillBatch":
        sources = prompt_sources(seqs)
        distinct = [s for i, s in enumerate(seqs) if sources[i] == i]
        packed_index = {i: k for k, i in enumerate(i for i in range(len(seqs)) if sources[i] == i)}
        images = [img for s in distinct for img in s.images]
        return cls(tokens=[t for s in distinct for t in s.tokens], lengths=[s.num_tokens for s in distinct],
                   slots=[x for s in distinct for x in blocks.slots(s.id)], images=images,
                   image_rows=image_rows(distinct, image_token_id) if images else [],
                   params=[s.params for s in seqs], seeds=[s.seed for s in seqs],
                   steps=[len(s.generated) for s in seqs], logit_rows=[packed_index[j] for j in sources],
                   block_copies=[(blocks.tables[seqs[j].id], blocks.tables[s.id])
                                 for i, (s, j) in enumerate(zip(seqs, sources)) if j != i],
                   allowed=[s.allowed_tokens() for s in seqs],
                   image_keys=[k for s in distinct for k in s.image_keys()])


def copy_blocks(cache: PagedKVCache, copies: list[tuple[list[int], list[int]]]) -> None:
    """Each (from, to) pair: the K/V of blocks `from` written into blocks `to`, in every layer."""
    if not copies:
        return
    device = cache.layers[0][0].device
    source = torch.tensor([b for src, _ in copies for b in src], dtype=torch.int64, device=device)
    target = torch.tensor([b for _, dst in copies for b in dst], dtype=torch.int64, device=device)
    for k, v in cache.layers:
        k[target] = k[source]
        v[target] = v[source]


@torch.inference_mode()
def run_prefill(model: Pixtral, cache: PagedKVCache, batch: PrefillBatch, stats: EngineStats,
                nvtx: bool = False, encoder_cache: EncoderCache | None = None) -> StepOutput:
    device = model.device
    t0 = time.perf_counter()
    with nvtx_range("vit", nvtx):
        features = encode_images(model, batch.images, batch.image_keys, encoder_cache) if batch.images else None
        if features is not None and features.is_cuda:
            torch.cuda.synchronize()  # only so that the ViT's share of prefill is measured
    stats.vit_seconds += time.perf_counter() - t0
    tokens = torch.tensor(batch.tokens, dtype=torch.int64, device=device)
    h = model.tok_embeddings(tokens)
    if features is not None:
        # Engine.add_request checked (model.check_request) that each prompt's [IMG] count matches its patches.
        rows = torch.tensor(batch.image_rows, dtype=torch.int64, device=device)
        h[rows] = features.to(h.dtype)
    slots = torch.tensor(batch.slots, dtype=torch.int64, device=device)
    meta = AttentionMetadata.for_sequences(batch.lengths, device, slot_mapping=slots)
    h = model.run_decoder(h, meta, cache.layers)
    copy_blocks(cache, batch.block_copies)
    last = torch.tensor(batch.lengths, dtype=torch.int64).cumsum(0) - 1
    logits = model.logits(h[last[batch.logit_rows].to(device)])
    return sample_rows(logits, batch.params, batch.seeds, batch.steps, batch.allowed)


def prefill(model: Pixtral, cache: PagedKVCache, blocks: BlockManager, seqs: list[Sequence], stats: EngineStats,
            nvtx: bool = False) -> StepOutput:
    image_token_id = None if model.args.vision is None else model.args.vision.image_token_id
    return run_prefill(model, cache, PrefillBatch.from_sequences(seqs, blocks, image_token_id), stats, nvtx)
