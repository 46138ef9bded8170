"""The plain-PyTorch attention (the oracle, and what the reference backend runs on a CPU) keeps
memory linear in the sequence: queries go chunk by chunk, so no [T, T] score matrix is ever
made, and the chunking changes nothing but memory."""
import math

import pytest
import torch

from pixtral_fast import reference


def qkv(n, q_heads, kv_heads, head_dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(1.5 * torch.randn(n, h, head_dim, generator=g)).to(dtype) for h in (q_heads, kv_heads, kv_heads)]


def explicit(q, k, v, scale, causal):
    """Whole score matrices, GQA by repeated heads: the math the chunks must reproduce."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(53, 53), (5, 53)])  # prefill; queries at the end of a longer context
def test_chunked_equals_whole(chunk, causal, lq, lk):
    q, k, v = qkv(lk, 6, 2, 16)
    q = q[-lq:]
    out = reference.attention(q, k, v, 0.3, causal, query_chunk=chunk)
    torch.testing.assert_close(out, explicit(q, k, v, 0.3, causal), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, reference.attention(q, k, v, 0.3, causal), atol=1e-12, rtol=1e-12)


def test_fp32_inputs_accumulate_in_fp32():
    q, k, v = qkv(40, 4, 4, 32, dtype=torch.bfloat16)
    out = reference.attention(q, k, v, 32 ** -0.5, True, query_chunk=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), explicit(q, k, v, 32 ** -0.5, True), atol=2e-6, rtol=2e-6)


def test_varlen_block_diagonal_and_causal_per_sequence():
    q, k, v = qkv(30, 4, 2, 16)
    cu = torch.tensor([0, 12, 12, 30], dtype=torch.int32)
    out = reference.varlen_attention(q, k, v, cu, 18, causal=True)
    for a, b in ((0, 12), (12, 30)):
        torch.testing.assert_close(out[a:b], explicit(q[a:b], k[a:b], v[a:b], 0.25, True), atol=1e-12, rtol=0)


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation torch made while fn ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_8k_token_reference_attention_memory_is_linear():
    """8192 tokens, fp32, causal, 2 query heads / 1 KV head x 16: whole score matrices would
    take 2 x 8192^2 x 4 B = 512 MiB (the decoder's 32 heads at 20k tokens: 51 GB); the largest
    allocation must stay at the score chunk (reference.SCORE_ELEMENTS fp32 values, 32 MiB)."""
    n, heads = 8192, 2
    q, k, v = qkv(n, heads, 1, 16, dtype=torch.float32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    biggest = _largest_allocation(lambda: reference.varlen_attention(q, k, v, cu, n, causal=True))
    whole = heads * n * n * 4
    bound = reference.SCORE_ELEMENTS * 4 * 1.25
    assert biggest <= bound, f"largest allocation {biggest / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    assert biggest <= whole / 8  # and far below what whole score matrices would take


def test_default_chunk_sized_from_the_budget(monkeypatch):
    """The default chunk holds at most SCORE_ELEMENTS scores and at least one query."""
    seen = []
    original = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        seen.append(self.numel())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    monkeypatch.setattr(reference, "SCORE_ELEMENTS", 1000)
    q, k, v = qkv(100, 4, 2, 8)
    reference.attention(q, k, v, 0.5, False)
    assert max(seen) <= 1000 and len(seen) == math.ceil(100 / (1000 // (4 * 100)))
    seen.clear()
    reference.attention(q[:1], torch.cat([k] * 5), torch.cat([v] * 5), 0.5, False)  # 4 x 500 > budget
    assert seen == [4 * 500]
