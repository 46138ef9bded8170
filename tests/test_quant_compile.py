"""Every shipped config of the quantized linears compiles ahead of time for sm_90, sm_89 and sm_80,
without a GPU, spills nothing and fits in shared memory.

The compile worker is tests/test_kernel_compile.py's (a subprocess without TRITON_INTERPRET: the
interpreter and the compiler cannot share a process, DESIGN §5). sm_89 (Ada, the smallest FP8
card these kernels target) runs the Ampere configs, with less shared memory per block.
"""
from __future__ import annotations

import pytest

from tests.test_kernel_compile import _run_worker, _table

MODULES = ["w4a16_linear", "fp8_linear"]
# opt-in dynamic shared memory per block, bytes (CUDA programming guide, compute capabilities)
SHARED_LIMIT = {90: 232448, 89: 101376, 80: 166912}


@pytest.mark.parametrize("cap", [90, 89, 80])
@pytest.mark.parametrize("module", MODULES)
def test_quant_kernels_compile(module, cap, tmp_path):
    proc, rows = _run_worker(module, cap, tmp_path)
    print(f"\n{module} sm_{cap}\n{_table(rows)}")
    assert rows, f"no output from the compile worker (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    errors = [r for r in rows if r.get("error")]
    assert not errors, "\n\n".join(f"{r['name']}: {r['error']}" for r in errors)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {r["name"].split("_")[1] for r in rows} == {"decode", "prefill"}, "both forms are shipped"
    for r in rows:
        assert r["local"] == 0 and r["stack"] == 0, f"{r['name']} uses local memory:\n{r['ptxas_log']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['name']} spills:\n{r['ptxas_log']}"
        assert 0 <= r["shared"] <= SHARED_LIMIT[cap], f"{r['name']} needs {r['shared']} B shared"
        assert r["registers"] > 0, f"{r['name']}: cuobjdump reported no registers"
