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


def check_graph_replay(decode, dtype, steps_lens, head_dim=128, kv_heads=8, group=4, block_size=16):
    """Captures decode(q, k_cache, v_cache, table, lens) once on static buffers, then loads each
    step's tables, lengths and caches into them and replays: the output must equal an eager call
    bit for bit and the fp64 oracle within tolerance. The first step is also the capture's."""
    from tests.tolerances import assert_close

    steps = [make_case(head_dim, kv_heads, group, block_size, lens, dtype, "cuda", seed=seed)
             for seed, lens in enumerate(steps_lens, start=2)]
    q = torch.empty_like(steps[0][0])
    k_cache = torch.zeros((max(s[1].shape[0] for s in steps),) + steps[0][1].shape[1:], dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    table = torch.full((len(steps_lens[0]), max(s[3].shape[1] for s in steps)), -1, dtype=torch.int32, device="cuda")
    lens = torch.empty(len(steps_lens[0]), dtype=torch.int32, device="cuda")

    def load(step):
        step_q, step_k, step_v, step_table, step_lens = step
        q.copy_(step_q)
        k_cache[:step_k.shape[0]].copy_(step_k)
        v_cache[:step_v.shape[0]].copy_(step_v)
        table.fill_(-1)
        table[:, :step_table.shape[1]].copy_(step_table)
        lens.copy_(step_lens)

    load(steps[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: compiles, loads or builds what it needs
        decode(q, k_cache, v_cache, table, lens)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode(q, k_cache, v_cache, table, lens)
    for step in steps[1:] + steps[:1]:
        load(step)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, decode(q, k_cache, v_cache, table, lens))
        assert_close(out, oracle(q, k_cache, v_cache, table, lens), dtype)
