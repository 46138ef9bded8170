"""The quantized linears against bf16 cuBLAS (torch's F.linear on the dense weight), same run: GB/s
of weight bytes read and the fraction of HBM bandwidth at the real Pixtral-12B decoder shapes, for
M = 1, 8, 32 (the decode form) and 256 (the prefill form). Weight loads dominate at small M, so
bytes are what the kernel must read: the packed weights and their scales (ours), the bf16 matrix
(the peer). Each output is checked once against its own reference before it is timed. Tiny shapes
under the interpreter on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from bench.timing import ON_GPU, OURS, measure
from pixtral_fast import ops, reference
from pixtral_fast.quant import formats

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16
# (out_features N, in_features K): w1/w3, w2, wo, wk/wv of Mistral-NeMo.
SHAPES = {"w13": (14336, 5120), "w2": (5120, 14336), "wo": (5120, 4096), "wkv": (1024, 5120)} if ON_GPU else \
         {"w13": (96, 160)}
MS = (1, 8, 32, 256) if ON_GPU else (3,)
GROUP = 128 if ON_GPU else 32


def _weights(n, k):
    g = torch.Generator(device=DEVICE).manual_seed(n + k)
    return torch.randn(n, k, device=DEVICE, generator=g, dtype=torch.float32) * k ** -0.5


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", [OURS + "_w4a16", OURS + "_fp8", "torch_bf16"])
def test_quantized_linear(benchmark, impl, shape, m):
    n, k = SHAPES[shape]
    w = _weights(n, k)
    x = torch.randn(m, k, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(m)).to(DTYPE)
    if impl == OURS + "_w4a16":
        packed, scales = formats.quantize_w4a16(w, GROUP, DTYPE)
        fn = lambda: ops.w4a16_linear(x, packed, scales, GROUP)  # noqa: E731
        expected = reference.w4a16_linear(x.float(), packed, scales, GROUP)
        nbytes = packed.numel() * 4 + scales.numel() * scales.element_size()
    elif impl == OURS + "_fp8":
        weight, scales = formats.quantize_fp8(w, per_channel=True, scale_dtype=DTYPE)
        fn = lambda: ops.fp8_linear(x, weight, scales)  # noqa: E731
        expected = reference.fp8_linear(x.float(), weight, scales)
        nbytes = weight.numel() + scales.numel() * scales.element_size()
    else:
        dense = w.to(DTYPE)
        fn = lambda: F.linear(x, dense)  # noqa: E731
        expected = F.linear(x.float(), dense.float())
        nbytes = dense.numel() * dense.element_size()
    measure(benchmark, fn, group=f"quant-linear-{shape}-{n}x{k}-M{m}", impl=impl, nbytes=nbytes, cold_l2=True,
            flops=2 * m * n * k, expected=expected, dtype=DTYPE)
