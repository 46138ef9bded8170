"""The embedding and the output head split by vocabulary rows. Their weights keep the names and
layout of nn.Embedding / nn.Linear (`weight`, [rows, dim]), so a rank's state dict has the same
keys as the whole model's, with this rank's rows (zero-padded to an equal share)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pixtral_fast.parallel.comm import Collectives


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, comm: Collectives, device=None, dtype=None):
        super().__init__()
        self.comm = comm
        self.start, self.rows = comm.plan.vocab(vocab)
        per = comm.plan.vocab_rows_per_rank(vocab)
        self.weight = nn.Parameter(torch.empty(per, dim, device=device, dtype=dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Tokens outside this rank's rows look up row 0 and are zeroed: the all-reduce then gives
        # every token the one rank's row that holds it (a sum with zeros: exact in any dtype).
        local = tokens - self.start
        outside = (local < 0) | (local >= self.rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.comm.all_reduce(h.masked_fill_(outside.unsqueeze(-1), 0))


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary rows, gathered so that every rank holds all of them (and
    so samples the same token)."""

    def __init__(self, dim: int, vocab: int, comm: Collectives, device=None, dtype=None):
        super().__init__()
        self.comm, self.vocab = comm, vocab
        per = comm.plan.vocab_rows_per_rank(vocab)
        self.weight = nn.Parameter(torch.empty(per, dim, device=device, dtype=dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.comm.gather_columns(F.linear(h, self.weight), self.vocab)
