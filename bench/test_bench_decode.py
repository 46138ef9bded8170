"""Paged GQA decode attention: the CUDA kernel and its Triton twin against gather + SDPA and
flash-attn's paged decode, batch {1, 8, 32} x context {1K, 4K, 32K} on a GPU (NeMo: 32/8 heads x
128, bf16, 16-token blocks), cold L2; bandwidth against the 4.8 TB/s of HBM. Each implementation's
output is checked once against the fp32 reference before it is timed."""
import pytest
import torch
import torch.nn.functional as F

from bench.timing import ON_GPU, OURS, measure
from pixtral_fast import ops, reference
from pixtral_fast.kernels import decode_attention as triton_decode

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16
BATCHES, CONTEXTS = ((1, 8, 32), (1024, 4096, 32768)) if ON_GPU else ((1, 3), (40, 300))
HQ, HKV, D = (32, 8, 128) if ON_GPU else (4, 1, 64)


def paged_case(batch, context, block_size=16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    blocks_per_seq = -(-context // block_size)
    n_blocks = batch * blocks_per_seq + 1
    k_cache, v_cache = (torch.randn(n_blocks, block_size, HKV, D, device=DEVICE, dtype=DTYPE, generator=g)
                        for _ in range(2))
    order = torch.randperm(n_blocks - 1, device=DEVICE, generator=g) + 1  # pages scattered over the pool
    table = order[: batch * blocks_per_seq].view(batch, blocks_per_seq).to(torch.int32).contiguous()
    seq_lens = torch.full((batch,), context, device=DEVICE, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device=DEVICE, dtype=DTYPE, generator=g)
    return q, k_cache, v_cache, table, seq_lens


def expected_output(q, k_cache, v_cache, table, lens):
    """The reference on fp32 copies of the same inputs: what every implementation must return."""
    return reference.gqa_decode_attention(q.float(), k_cache.float(), v_cache.float(), table, lens)


def sdpa_gather(q, k_cache, v_cache, table, context):
    """The plain peer: gather the pages, repeat KV heads, one SDPA call for the batch."""
    k = k_cache[table.long()].flatten(1, 2)[:, :context].transpose(1, 2)
    v = v_cache[table.long()].flatten(1, 2)[:, :context].transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", [OURS + "_cuda", OURS + "_triton", "sdpa_gather", "flash_attn_kvcache", "reference"])
def test_gqa_decode(benchmark, impl, batch, context):
    q, kc, vc, table, lens = paged_case(batch, context)
    expected, output = None, lambda out: out
    if impl == OURS + "_cuda":
        if ops.decode_backend(q.device, q.dtype, q.shape[-1]) != "cuda":
            pytest.skip("the CUDA extension is not built or this is not a GPU")
        fn = lambda: ops.gqa_decode_attention(q, kc, vc, table, lens, validate_indices=False)  # noqa: E731
    elif impl == OURS + "_triton":
        fn = lambda: triton_decode.gqa_decode_attention(q, kc, vc, table, lens, D ** -0.5)  # noqa: E731
    elif impl == "sdpa_gather":
        fn = lambda: sdpa_gather(q, kc, vc, table, context)  # noqa: E731
        output = lambda out: out[:, :, 0]  # noqa: E731  [B, H, 1, D] -> [B, H, D]
    elif impl == "reference":
        if ON_GPU and batch * context > 8 * 4096:
            pytest.skip("the per-sequence Python oracle is too slow to time at this size")
        fn = lambda: reference.gqa_decode_attention(q, kc, vc, table, lens)  # noqa: E731
    else:
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError:
            pytest.skip("flash-attn is not installed")
        # flash-attn's paged KV needs pages of 256 tokens: same bytes, its own layout
        q2, kc2, vc2, table2, lens2 = paged_case(batch, context, block_size=256)
        fn = lambda: flash_attn_with_kvcache(q2[:, None], kc2, vc2, cache_seqlens=lens2, block_table=table2)  # noqa: E731
        expected, output = expected_output(q2, kc2, vc2, table2, lens2), lambda out: out[:, 0]  # noqa: E731
    if expected is None:
        expected = expected_output(q, kc, vc, table, lens)
    kv_bytes = 2 * batch * context * HKV * D * q.element_size()
    measure(benchmark, fn, group=f"decode-b{batch}-ctx{context}", impl=impl,
            nbytes=kv_bytes + 2 * q.numel() * q.element_size(), cold_l2=True, expected=expected, dtype=DTYPE,
            output=output)
