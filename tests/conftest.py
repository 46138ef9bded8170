"""Test set-up: see tests/support/env.py (interpreter + bf16 shim on CPU-only machines)."""
from tests.support.env import DEVICE, HAS_CUDA, skip_gpu_items  # noqa: F401  (first: before pixtral_fast)

import os  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.support import tables  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_collection_modifyitems(config, items):
    skip_gpu_items(items)


def pytest_configure(config):
    # Made here, in the controller, before pytest-xdist starts its workers: they inherit it.
    os.environ.setdefault(tables.FOLDER_VARIABLE, tempfile.mkdtemp(prefix="pixtral_fast_tables_"))


def pytest_terminal_summary(terminalreporter):
    for name, lines in tables.published():
        terminalreporter.write_sep("-", name)
        for line in lines:
            terminalreporter.write_line(line)
    measured = tables.published_data("decode_launches", "sass_ceilings")
    if measured is not None:  # both ran: the static estimate of a Pixtral-12B decode step
        from bench.decode_estimate import estimate

        terminalreporter.write_sep("-", "decode step estimate, Pixtral-12B batch 1 (static, no GPU)")
        for line in estimate(*measured):
            terminalreporter.write_line(line)


@pytest.fixture
def device():
    return DEVICE
