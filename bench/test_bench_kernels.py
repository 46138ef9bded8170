"""Vision-path kernels against their peers, same run (our ops called as the model calls them:
metadata checks that sync are off, since the model builds cu_seqlens on the host): varlen attention (RoPE-2D fused), RoPE-2D
alone, the fused gated FFN, and decoder prefill attention. Real shapes on a GPU (the ViT on one
1024x1024 image and on four mixed images; NeMo prefill at 4K tokens), tiny ones on the CPU. Each
implementation's output is checked once against the reference (fp32 copies of the same inputs)
before it is timed."""
import pytest
import torch
import torch.nn.functional as F

from bench.timing import ON_GPU, OURS, measure
from pixtral_fast import ops, reference

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16
# Patch grids (rows, cols): 1024x1024; 1024x768, 512x512, 256x1024 (h x w), 64x64 px.
IMAGES = {"1x1024sq": [(64, 64)], "4mixed": [(64, 48), (32, 32), (16, 64), (4, 4)]} if ON_GPU else \
         {"1x1024sq": [(5, 4)], "4mixed": [(5, 3), (2, 2), (1, 4), (1, 1)]}
VIT_HEADS, VIT_DIM, VIT_FFN = (16, 1024, 4096) if ON_GPU else (2, 128, 256)
PREFILL_TOKENS, PREFILL_HEADS = (4096, (32, 8)) if ON_GPU else (48, (4, 1))


def flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func
    except ImportError:
        return None


def packed(grids, heads=VIT_HEADS, d=64, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    sizes = [r * c for r, c in grids]
    total = sum(sizes)
    q, k, v = (torch.randn(total, heads, d, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
    pos = torch.cat([torch.cartesian_prod(torch.arange(r), torch.arange(c)) for r, c in grids]).to(DEVICE, torch.int32)
    cu = torch.tensor([0] + sizes, device=DEVICE).cumsum(0).to(torch.int32)
    return q, k, v, pos, cu, max(sizes)


def attention_flops(lengths, heads, d, causal=False):
    return sum(4 * n * n * heads * d for n in lengths) / (2 if causal else 1)


@pytest.mark.parametrize("images", IMAGES)
@pytest.mark.parametrize("impl", [OURS + "+rope", OURS, "sdpa_loop", "sdpa_block_mask", "flash_attn", "reference+rope"])
def test_vit_attention(benchmark, images, impl):
    grids = IMAGES[images]
    q, k, v, pos, cu, max_len = packed(grids)
    lengths = [r * c for r, c in grids]
    rope = impl.endswith("+rope")
    expected = reference.varlen_attention(q.float(), k.float(), v.float(), cu, max_len, pos=pos if rope else None)
    output = lambda out: out  # noqa: E731
    if impl == OURS + "+rope":
        fn = lambda: ops.varlen_attention(q, k, v, cu, max_len, pos=pos, validate_indices=False)  # noqa: E731
    elif impl == OURS:
        fn = lambda: ops.varlen_attention(q, k, v, cu, max_len, validate_indices=False)  # noqa: E731
    elif impl == "reference+rope":
        fn = lambda: reference.varlen_attention(q, k, v, cu, max_len, pos=pos)  # noqa: E731
    elif impl == "sdpa_loop":
        bounds = cu.tolist()

        def fn():
            return [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)))
                    for s, e in zip(bounds[:-1], bounds[1:])]

        output = lambda outs: torch.cat([o.transpose(0, 1) for o in outs])  # noqa: E731
    elif impl == "sdpa_block_mask":
        seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE))
        mask = seq_id[:, None] == seq_id[None, :]
        fn = lambda: F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask)  # noqa: E731
        output = lambda out: out.transpose(0, 1)  # noqa: E731
    else:
        fa = flash_attn()
        if fa is None or not ON_GPU:
            pytest.skip("flash-attn is not installed")
        fn = lambda: fa(q, k, v, cu, cu, max_len, max_len)  # noqa: E731
    measure(benchmark, fn, group=f"vit-attention-{images}", impl=impl,
            flops=attention_flops(lengths, VIT_HEADS, 64), expected=expected, dtype=DTYPE, output=output)


@pytest.mark.parametrize("impl", [OURS, "sdpa_causal_gqa", "flash_attn", "reference"])
def test_decoder_prefill_attention(benchmark, impl):
    hq, hkv = PREFILL_HEADS
    g = torch.Generator(device=DEVICE).manual_seed(1)
    n = PREFILL_TOKENS
    q = torch.randn(n, hq, 128, device=DEVICE, dtype=DTYPE, generator=g)
    k, v = (torch.randn(n, hkv, 128, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(2))
    cu = torch.tensor([0, n], device=DEVICE, dtype=torch.int32)
    expected = reference.varlen_attention(q.float(), k.float(), v.float(), cu, n, causal=True)
    output = lambda out: out  # noqa: E731
    if impl == OURS:
        fn = lambda: ops.varlen_attention(q, k, v, cu, n, causal=True, validate_indices=False)  # noqa: E731
    elif impl == "reference":
        fn = lambda: reference.varlen_attention(q, k, v, cu, n, causal=True)  # noqa: E731
    elif impl == "sdpa_causal_gqa":
        fn = lambda: F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # noqa: E731
                                                    is_causal=True, enable_gqa=True)
        output = lambda out: out.transpose(0, 1)  # noqa: E731
    else:
        fa = flash_attn()
        if fa is None or not ON_GPU:
            pytest.skip("flash-attn is not installed")
        fn = lambda: fa(q, k, v, cu, cu, n, n, causal=True)  # noqa: E731
    measure(benchmark, fn, group=f"prefill-attention-{n}tok-{hq}x{hkv}", impl=impl,
            flops=attention_flops([n], hq, 128, causal=True), expected=expected, dtype=DTYPE, output=output)


@pytest.mark.parametrize("impl", [OURS, "reference"])
def test_rope_2d(benchmark, impl):
    q, k, _, pos, _, _ = packed(IMAGES["1x1024sq"])
    fn = (lambda: ops.rope_2d(q, k, pos)) if impl == OURS else (lambda: reference.rope_2d(q, k, pos))
    nbytes = 2 * 2 * q.numel() * q.element_size() + pos.numel() * 4  # read and write q and k
    measure(benchmark, fn, group="rope-2d-1x1024sq", impl=impl, nbytes=nbytes, cold_l2=True,
            expected=reference.rope_2d(q.float(), k.float(), pos), dtype=DTYPE)


@pytest.mark.parametrize("impl", [OURS, "torch_unfused", "reference"])
def test_vit_gated_ffn(benchmark, impl):
    m = sum(r * c for r, c in IMAGES["1x1024sq"])
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(m, VIT_DIM, device=DEVICE, dtype=DTYPE, generator=g)
    wg, wu = (torch.randn(VIT_FFN, VIT_DIM, device=DEVICE, dtype=DTYPE, generator=g) * VIT_DIM ** -0.5 for _ in range(2))
    wd = torch.randn(VIT_DIM, VIT_FFN, device=DEVICE, dtype=DTYPE, generator=g) * VIT_FFN ** -0.5
    if impl == OURS:
        fn = lambda: ops.gated_ffn(x, wg, wu, wd, "silu")  # noqa: E731
    elif impl == "torch_unfused":
        fn = lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)  # noqa: E731
    else:
        fn = lambda: reference.gated_ffn(x, wg, wu, wd, "silu")  # noqa: E731
    expected = reference.gated_ffn(x.float(), wg.float(), wu.float(), wd.float(), "silu")
    measure(benchmark, fn, group=f"vit-ffn-{m}x{VIT_DIM}x{VIT_FFN}", impl=impl, flops=6 * m * VIT_DIM * VIT_FFN,
            expected=expected, dtype=DTYPE)
