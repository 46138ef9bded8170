"""The quantized linears against bf16 cuBLAS (torch.matmul on the dense weight), same run: GB/s of
weight bytes read and the fraction of HBM bandwidth (4.8 TB/s) at the real Pixtral-12B decoder
shapes, for M = 1, 8, 32 (the decode form) and 256 (the prefill form). Weight loads dominate at
small M, so bytes are what the kernel must read: the packed weights and their scales (ours), the
bf16 matrix (the peer). Each output is checked once against its own reference before it is timed
(bench/timing.py's measure). No other W4A16 kernel is installed on the device, so cuBLAS bf16 is
the one peer.

Cost on an H200, inside the device check's `kernels` stage (60 s for every kernel benchmark):
48 cases; the weights of each shape are made and quantized once (cached), each case times a few
dozen rounds of 0.01-0.3 ms (budget_s below), so the stage pays mostly the four JIT compiles
(w4a16 and fp8, decode and prefill form; M is not specialized, so decode batches share one):
about 5-10 s in all. On the CPU: one tiny shape under the interpreter, both forms."""
import functools

import pytest
import torch

from bench.timing import ON_GPU, OURS, measure
from pixtral_fast import ops, reference
from pixtral_fast.quant import formats

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16
# (out_features N, in_features K): w1/w3, w2, wo, wk/wv of Mistral-NeMo.
SHAPES = {"w13": (14336, 5120), "w2": (5120, 14336), "wo": (5120, 4096), "wkv": (1024, 5120)} if ON_GPU else \
         {"w13": (96, 160)}
MS = (1, 8, 32, 256) if ON_GPU else (3, 40)
GROUP = 128 if ON_GPU else 32
BUDGET_S = 0.005  # per case: enough rounds for a stable median of a 10-300 us kernel, no more
IMPLS = {OURS + "_w4a16": "w4a16", OURS + "_fp8": "fp8", "torch_matmul_bf16": "bf16"}


@functools.cache
def _weights(shape: str, scheme: str) -> tuple[torch.Tensor, ...]:
    """One dense draw per shape, stored as each scheme stores it; made once per run."""
    n, k = SHAPES[shape]
    g = torch.Generator(device=DEVICE).manual_seed(n + k)
    w = torch.randn(n, k, device=DEVICE, generator=g, dtype=torch.float32) * k ** -0.5
    if scheme == "w4a16":
        return formats.quantize_w4a16(w, GROUP, DTYPE)
    if scheme == "fp8":
        return formats.quantize_fp8(w, per_channel=True, scale_dtype=DTYPE)
    return (w.to(DTYPE).t(),)  # [K, N] view of the [N, K] weight: what F.linear hands cuBLAS


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_quantized_linear(benchmark, impl, shape, m):
    n, k = SHAPES[shape]
    scheme = IMPLS[impl]
    stored = _weights(shape, scheme)
    x = torch.randn(m, k, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(m)).to(DTYPE)
    if scheme == "w4a16":
        packed, scales = stored
        fn = lambda: ops.w4a16_linear(x, packed, scales, GROUP)  # noqa: E731
        expected = reference.w4a16_linear(x.float(), packed, scales, GROUP)
    elif scheme == "fp8":
        weight, scales = stored
        fn = lambda: ops.fp8_linear(x, weight, scales)  # noqa: E731
        expected = reference.fp8_linear(x.float(), weight, scales)
    else:
        (dense_t,) = stored
        fn = lambda: torch.matmul(x, dense_t)  # noqa: E731
        expected = x.float() @ dense_t.float()
    measure(benchmark, fn, group=f"quant-linear-{shape}-{n}x{k}-M{m}", impl=impl, nbytes=_nbytes(stored),
            cold_l2=True, flops=2 * m * n * k, expected=expected, dtype=DTYPE, budget_s=BUDGET_S)
