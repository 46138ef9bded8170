"""Per-dtype tolerances, written once. Fast ops are compared with the reference run on fp64
copies of the same (already rounded) inputs, so each bound covers only what the kernel itself
may lose. Never loosen one to make a test pass: find the bug."""
import torch

# (atol, rtol) for torch.testing.assert_close(actual, expected_fp64)
TOL = {
    # fp32 kernels use IEEE fp32 dots (no TF32); what is left is summation order over a few
    # thousand terms of O(1) values: ~1e-6, with a 10x margin.
    torch.float32: (2e-5, 2e-5),
    # fp16: the output is rounded once (0.5 ulp = 2.4e-4 relative near 1) and the softmax
    # probabilities / gated intermediate are rounded to fp16 before the second GEMM (another
    # ulp or so, averaged over the sum): 4 ulps of 2^-11.
    torch.float16: (2e-3, 2e-3),
    # bf16: same budget in bf16 ulps (2^-8 = 3.9e-3): 4 ulps. It also covers the 1-ulp difference
    # between the GPU's round-to-nearest and any truncating cast.
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Model-level comparisons (HF parity, fast vs reference ViT) run in fp32 only.
MODEL_FP32_ATOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=msg or None)
