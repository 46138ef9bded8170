"""Every shipped config of the quantized linears compiles ahead of time for sm_90, sm_89 and sm_80,
without a GPU, spills nothing and fits in shared memory.

The compile worker is tests/support/kernel_compile.py (a subprocess without TRITON_INTERPRET: the
interpreter and the compiler cannot share a process, DESIGN §5). sm_89 (Ada, the smallest FP8
card these kernels target) runs the Ampere configs, with less shared memory per block.
"""
from __future__ import annotations

import pytest

from tests.support.kernel_compile import assert_compiles_cleanly

MODULES = ["w4a16_linear", "fp8_linear"]
# opt-in dynamic shared memory per block, bytes (CUDA programming guide, compute capabilities)
SHARED_LIMIT = {90: 232448, 89: 101376, 80: 166912}


@pytest.mark.parametrize("cap", [90, 89, 80])
@pytest.mark.parametrize("module", MODULES)
def test_quant_kernels_compile(module, cap, tmp_path):
    rows = assert_compiles_cleanly(module, cap, tmp_path, SHARED_LIMIT[cap])
    assert {r["name"].split("_")[1] for r in rows} == {"decode", "prefill"}, "both forms are shipped"
