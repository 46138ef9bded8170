"""Paged-KV test cases shared by the Triton and CUDA decode-attention tests."""
import torch

from pixtral_fast import reference


def make_case(head_dim, kv_heads, group, block_size, seq_lens, dtype, device="cpu", seed=0, garbage=-1):
    """q, paged caches and a shuffled block table whose unused entries hold `garbage`; a spare
    column and a few spare blocks that no sequence owns make stray reads visible."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 3
    owner = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(seq_lens), max(blocks) + 1), garbage, dtype=torch.int32)
    start = 0
    for row, n in enumerate(blocks):
        table[row, :n] = owner[start:start + n].int()
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    # Peakier than unit logits, so the online max really moves between tiles and splits.
    q = (2.0 * torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen)).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, table, lens)]


def oracle(q, k_cache, v_cache, table, lens, scale=None):
    """The fp64 reference, on the CPU whatever the inputs' device."""
    out = reference.gqa_decode_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(),
                                         table.cpu(), lens.cpu(), scale)
    return out.to(q.device)
