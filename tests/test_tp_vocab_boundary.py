"""The vocabulary-parallel embedding at the edges of each rank's share: token ids that are the
first and the last of every share (and the first of the next) look up exactly the plain
embedding's rows, for vocabularies that the ranks do not divide evenly (the last share padded, or
holding no real row at all). Ranks are simulated in one process: each rank's layer runs on its
own share, and the all-reduce is the sum of their outputs (what the gloo/NCCL all-reduce computes)."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pixtral_fast.parallel.layers import VocabParallelEmbedding
from pixtral_fast.parallel.plan import ShardPlan

DIM = 3
# (vocab, ranks): Pixtral's 131072 halves at 65536; the others leave the last share short or empty
CASES = [(131072, 2), (10, 3), (9, 4), (7, 2), (12, 4), (5, 8)]


class RankView:
    """What a layer sees of its rank: the plan, and an all-reduce that leaves the partial result
    for the test to sum."""

    def __init__(self, size: int, rank: int):
        self.plan = ShardPlan(size, rank)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def shares(vocab: int, size: int) -> list[tuple[int, int]]:
    """[first id, end id) of each rank's real rows, worked out by hand: ceil(vocab / size) ids a
    rank, in rank order, the last share cut at the vocabulary's end (empty past it)."""
    per = -(-vocab // size)
    return [(min(r * per, vocab), min((r + 1) * per, vocab)) for r in range(size)]


def boundary_ids(vocab: int, size: int) -> list[int]:
    ids = set()
    for first, end in shares(vocab, size):
        ids |= {first, first + 1, end - 1, end}
    return sorted(i for i in ids if 0 <= i < vocab)


def padded_share(weight: torch.Tensor, vocab: int, size: int, rank: int) -> torch.Tensor:
    per = -(-vocab // size)
    first, end = shares(vocab, size)[rank]
    out = torch.zeros(per, weight.shape[1], dtype=weight.dtype)
    out[:end - first] = weight[first:end]
    return out


@pytest.mark.parametrize("vocab, size", CASES)
def test_share_boundary_tokens_embed_as_the_plain_embedding(vocab, size):
    weight = torch.randn(vocab, DIM, generator=torch.Generator().manual_seed(vocab * 31 + size))
    tokens = torch.tensor(boundary_ids(vocab, size))
    if vocab == 131072:
        assert 65535 in tokens and 65536 in tokens  # the ids either side of the two shares' edge
    total = torch.zeros(len(tokens), DIM)
    for rank in range(size):
        layer = VocabParallelEmbedding(vocab, DIM, RankView(size, rank))
        with torch.no_grad():
            layer.weight.copy_(padded_share(weight, vocab, size, rank))
            total += layer(tokens)
    torch.testing.assert_close(total, F.embedding(tokens, weight), rtol=0, atol=0)


@pytest.mark.parametrize("vocab, size", CASES)
def test_each_rank_zeroes_exactly_the_tokens_outside_its_share(vocab, size):
    tokens = torch.tensor(boundary_ids(vocab, size))
    for rank, (first, end) in enumerate(shares(vocab, size)):
        layer = VocabParallelEmbedding(vocab, DIM, RankView(size, rank))
        with torch.no_grad():
            layer.weight.fill_(1.0)  # any row of the share is non-zero
            held = layer(tokens).abs().sum(-1) > 0
        assert held.tolist() == [first <= t < end for t in tokens.tolist()], f"rank {rank} of {size}"

