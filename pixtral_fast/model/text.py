"""Mistral-NeMo decoder layer: GQA attention with 1-D RoPE on interleaved pairs, SiLU-gated FFN.

One layer serves three passes, told apart by an explicit AttentionMetadata (no hidden state):
full recomputation (no cache), prefill into a paged KV cache, and one decode step over it."""
from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pixtral_fast.config import TextArgs
from pixtral_fast.model.common import AttentionProjections, FeedForward, RMSNorm

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, kv_heads, head_dim]


@dataclass
class AttentionMetadata:
    positions: torch.Tensor                    # int32 [T]: position of each token in its sequence
    cu_seqlens: torch.Tensor | None = None     # int32 [n+1]: packed prompts (prefill / full pass)
    max_seqlen: int = 0
    slot_mapping: torch.Tensor | None = None   # int64 [T]: flat cache slot of each new token's K/V
    block_table: torch.Tensor | None = None    # int32 [B, max_blocks]: decode only
    seq_lens: torch.Tensor | None = None       # int32 [B]: decode only, the new token included
    pages_checked: bool = False                # the caller validated block_table/seq_lens already
    # cu_seqlens is only ever built on the host by for_sequences: valid by construction.

    @property
    def is_decode(self) -> bool:
        return self.block_table is not None

    @classmethod
    def for_sequences(cls, lengths: list[int], device, slot_mapping: torch.Tensor | None = None):
        """Prefill / full pass over sequences packed back to back, each starting at position 0."""
        positions = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])
        cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
        return cls(positions=positions.to(device), cu_seqlens=cu.to(device), max_seqlen=max(lengths),
                   slot_mapping=slot_mapping)


class DecoderLayer(nn.Module):
    """`args` are this rank's share of the decoder under tensor parallelism; `reduce` then sums the
    ranks' partial outputs of wo and of the FFN's w2 (row parallel), in place."""

    def __init__(self, args: TextArgs, device=None, dtype=None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.reduce = reduce
        kw = dict(device=device, dtype=dtype)
        self.attention = AttentionProjections(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, **kw)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, **kw)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, **kw)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, **kw)
        self.rope_theta = args.rope_theta

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kernels: types.ModuleType,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.attention.qkv(self.attention_norm(x, kernels), kernels)
        if kv_cache is None:
            q, k = kernels.rope_1d(q, k, meta.positions, self.rope_theta)
        else:  # the rotated k and v go straight into the cache, in the same launch
            k_cache, v_cache = kv_cache
            q, k = kernels.rope_1d_kv_cache(q, k, v, meta.positions, self.rope_theta, k_cache, v_cache,
                                            meta.slot_mapping, validate_indices=False)
        if meta.is_decode:
            o = kernels.gqa_decode_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens,
                                             validate_indices=not meta.pages_checked)
        else:
            o = kernels.varlen_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, causal=True,
                                         validate_indices=False)
        attn = self.attention.wo(o.flatten(1))
        normed, h = self.ffn_norm.after_add(attn if self.reduce is None else self.reduce(attn), x, kernels)
        ffn = self.feed_forward(normed, kernels)
        return h + (ffn if self.reduce is None else self.reduce(ffn))
