"""The split-K GEMV (kernels/gemv.py) against cuBLAS (torch.nn.functional.linear), same run, at
Pixtral-12B's bf16 decoder linears: fused QKV (N 6144, K 5120), output head (131072, 5120: 1.34 GB,
the largest single read), wo (5120, 4096) and w2 (5120, 14336), M = 1, 8, 32. Weight loads dominate
at small M, so each case records GB/s of the bytes it must move (the weight, x and the output) and
the fraction of HBM bandwidth, L2 flushed before each round (bench/timing.py's measure, which also
checks each output once against the fp32 reference before timing it).

The real shapes are GPU-marked (skipped with a reason on the CPU). On the CPU, one tiny shape
runs both implementations once, ours under Triton's interpreter, so that `make test`'s
`-m "not gpu"` bench run exercises this file. Cost on an H200: 24 cases of 10-300 us rounds
(BUDGET_S), the weights made once per shape (cached), the two GEMV compiles (16- and 32-row
tiles; M is not specialized) and the reduction's: a few seconds."""
import functools

import pytest
import torch
import torch.nn.functional as F

from bench.timing import ON_GPU, OURS, measure
from pixtral_fast.kernels.gemv import gemv

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16
SHAPES = {"qkv": (6144, 5120), "head": (131072, 5120), "wo": (5120, 4096), "w2": (5120, 14336)}
MS = (1, 8, 32)
TINY = {"tiny": (96, 160)}  # the CPU case: several interpreter tiles, a K split
BUDGET_S = 0.005  # per case: a stable median of a 10-300 us kernel, no more
IMPLS = (OURS, "torch_linear_cublas")


@functools.cache
def _weight(n: int, k: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(n + k)
    return (torch.randn(n, k, device=DEVICE, generator=g) * k ** -0.5).to(DTYPE)


def _cases():
    for impl in IMPLS:
        for shape in SHAPES:
            for m in MS:
                yield pytest.param(impl, shape, m, id=f"{impl}-{shape}-M{m}", marks=pytest.mark.gpu)
        if not ON_GPU:
            yield pytest.param(impl, "tiny", 3, id=f"{impl}-tiny-M3")


@pytest.mark.parametrize("impl,shape,m", list(_cases()))
def test_bf16_linear_small_m(benchmark, impl, shape, m):
    n, k = {**SHAPES, **TINY}[shape]
    w = _weight(n, k)
    x = torch.randn(m, k, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(m)).to(DTYPE)
    fn = (lambda: gemv(x, w)) if impl == OURS else (lambda: F.linear(x, w))  # noqa: E731
    expected = x.float() @ w.float().T
    nbytes = (n * k + m * k + m * n) * DTYPE.itemsize
    measure(benchmark, fn, group=f"bf16-linear-{shape}-{n}x{k}-M{m}", impl=impl, nbytes=nbytes, cold_l2=True,
            flops=2 * m * n * k, expected=expected, dtype=DTYPE, budget_s=BUDGET_S)
