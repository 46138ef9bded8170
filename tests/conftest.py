"""Test set-up: see tests/support/env.py (interpreter + bf16 shim on CPU-only machines)."""
from tests.support.env import DEVICE, HAS_CUDA, skip_gpu_items  # noqa: F401  (first: before pixtral_fast)

import pytest  # noqa: E402
import torch  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_collection_modifyitems(config, items):
    skip_gpu_items(items)


@pytest.fixture
def device():
    return DEVICE
