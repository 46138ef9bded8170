"""Every Triton config we ship compiles ahead of time for sm_90 and sm_80, without a GPU, spills
nothing and fits in shared memory (the compile worker and the checks: tests/support/kernel_compile.py).
"""
from __future__ import annotations

import pytest

from tests.support.kernel_compile import assert_compiles_cleanly

MODULES = ["rope_2d", "rms_norm", "silu_mul", "varlen_attention", "gated_ffn", "decode_attention", "gemv"]
SHARED_LIMIT = {90: 232448, 80: 166912}  # opt-in dynamic shared memory per block, bytes


@pytest.mark.parametrize("cap", [90, 80])
@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile(module, cap, tmp_path):
    assert_compiles_cleanly(module, cap, tmp_path, SHARED_LIMIT[cap])
