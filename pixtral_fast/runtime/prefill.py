"""Prefill of newly admitted sequences: their images through one packed ViT pass, their tokens
(the prompt, plus whatever they generated before a preemption) through one varlen causal pass that
fills the paged cache, then each one's next token."""
from __future__ import annotations

import time

import torch

from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.model.text import AttentionMetadata
from pixtral_fast.runtime.kv_cache import BlockManager, PagedKVCache
from pixtral_fast.runtime.profiling import nvtx_range
from pixtral_fast.runtime.requests import EngineStats
from pixtral_fast.runtime.sampling import StepOutput, sample_rows
from pixtral_fast.runtime.scheduler import Sequence


def image_rows(seqs: list[Sequence], image_token_id: int) -> list[int]:
    """Rows of the packed batch that take image features: the [IMG] tokens of each prompt, in
    order. An [IMG] the model generated (re-prefilled after a preemption) is an ordinary token and
    keeps its embedding, as it had when it was decoded."""
    rows, start = [], 0
    for seq in seqs:
        rows += [start + i for i, t in enumerate(seq.prompt) if t == image_token_id]
        start += len(seq.tokens)
    return rows


@torch.inference_mode()
def prefill(model: Pixtral, cache: PagedKVCache, blocks: BlockManager, seqs: list[Sequence], stats: EngineStats,
            nvtx: bool = False) -> StepOutput:
    device = model.device
    images = [img for s in seqs for img in s.images]
    t0 = time.perf_counter()
    with nvtx_range("vit", nvtx):
        features = model.encode_images(images) if images else None
        if features is not None and features.is_cuda:
            torch.cuda.synchronize()  # only so that the ViT's share of prefill is measured
    stats.vit_seconds += time.perf_counter() - t0
    tokens = torch.tensor([t for s in seqs for t in s.tokens], dtype=torch.int64, device=device)
    h = model.tok_embeddings(tokens)
    if features is not None:
        # Engine.add_request checked (model.check_request) that each prompt's [IMG] count matches its patches.
        rows = torch.tensor(image_rows(seqs, model.args.vision.image_token_id), dtype=torch.int64, device=device)
        h[rows] = features.to(h.dtype)
    lengths = [len(s.tokens) for s in seqs]
    slots = torch.tensor([x for s in seqs for x in blocks.slots(s.id)], dtype=torch.int64, device=device)
    meta = AttentionMetadata.for_sequences(lengths, device, slot_mapping=slots)
    h = model.decode_hidden(h, meta, cache.layers)
    last = torch.tensor(lengths, dtype=torch.int64).cumsum(0) - 1
    logits = model.logits(h[last.to(device)])
    return sample_rows(logits, [s.params for s in seqs], [s.seed for s in seqs], [len(s.generated) for s in seqs])
