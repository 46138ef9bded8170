"""Process set-up shared by tests/ and bench/: without a GPU, Triton kernels run under the
interpreter (TRITON_INTERPRET=1, which must be set before any @triton.jit decorator runs, i.e.
before pixtral_fast is imported). pixtral_fast.kernels installs its bf16 interpreter fix itself."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
GPU_SKIP_REASON = "needs a CUDA GPU (none on this machine); bench/device_check.sh runs it on a lent H200"


def skip_gpu_items(items) -> None:
    if HAS_CUDA:
        return
    import pytest

    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
