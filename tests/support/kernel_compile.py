"""Ahead-of-time compilation of the Triton configs we ship, without a GPU (tests/test_kernel_compile.py,
tests/test_quant_compile.py).

Each (module, arch) runs in a subprocess without TRITON_INTERPRET (the interpreter and the
compiler cannot share a process; DESIGN §5), which is this file run as a script:
`python tests/support/kernel_compile.py MODULE CAP OUT_DIR`. It compiles every spec of
`compile_specs(CAP)` (two at a time: this machine has two cores), writes each cubin to OUT_DIR,
reads registers / stack / local bytes with the cuobjdump bundled with Triton, takes spill
counts from ptxas's own log (TRITON_DUMP_PTXAS_LOG) and prints one JSON line per spec.
The dynamic shared memory is `compiled.metadata.shared`: cuobjdump only sees the static part.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

WORKERS = 2
TIMEOUT_S = 900  # generous (two cores, ~50 specs): a hung ptxas fails the test, not the whole CI run


# ---------------------------------------------------------------------------------------------
# worker side (subprocess)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resource_usage(cubin: Path) -> dict:
    """Largest REG / STACK / LOCAL over the cubin's functions (one kernel each, helpers inlined)."""
    out = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], check=True, capture_output=True,
                         text=True).stdout
    usage = {"registers": 0, "stack": 0, "local": 0}
    for key, field in (("registers", "REG"), ("stack", "STACK"), ("local", "LOCAL")):
        values = [int(v) for v in re.findall(rf"\b{field}:(\d+)", out)]
        usage[key] = max(values, default=-1)
    return usage


def _attrs(spec: dict) -> dict:
    """Optional spec["attrs"]: the hints the JIT derives at run time from 16-byte aligned pointers
    and ints divisible by 16, e.g. {"x_ptr": [["tt.divisibility", 16]]} (without them loads
    compile scalar). Keys are argument names or Triton's own (index,) tuples."""
    names = spec["fn"].arg_names
    return {(names.index(k),) if isinstance(k, str) else tuple(k): v
            for k, v in spec.get("attrs", {}).items()}


def _compile_one(job: tuple[str, int, int, str]) -> dict:
    import contextlib
    import importlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, cap, index, out_dir = job
    spec = importlib.import_module(f"pixtral_fast.kernels.{module}").compile_specs(cap)[index]
    row = {"name": spec["name"], "error": None}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        attrs = _attrs(spec)
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log with print()
            compiled = triton.compile(
                ASTSource(spec["fn"], spec["signature"], spec["constexprs"], attrs),
                target=GPUTarget("cuda", cap, 32),
                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
            )
        cubin = Path(out_dir) / f"{spec['name']}_sm{cap}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        row.update(_resource_usage(cubin))
        row["shared"] = int(compiled.metadata.shared)
    except Exception as exc:  # reported as a row: the other specs still get compiled
        row["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    row["spill_stores"] = max((int(s) for s, _ in spills), default=0)
    row["spill_loads"] = max((int(l) for _, l in spills), default=0)
    row["ptxas_log"] = log.getvalue().strip()[-2000:]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main(argv: list[str]) -> int:
    import importlib
    import multiprocessing

    module, cap, out_dir = argv[0], int(argv[1]), argv[2]
    try:
        n_specs = len(importlib.import_module(f"pixtral_fast.kernels.{module}").compile_specs(cap))
    except Exception as exc:
        print(json.dumps({"name": f"{module}.compile_specs", "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    jobs = [(module, cap, i, out_dir) for i in range(n_specs)]
    # fork: the workers inherit the imported modules instead of importing torch again.
    with multiprocessing.get_context("fork").Pool(min(WORKERS, max(1, n_specs))) as pool:
        for row in pool.imap_unordered(_compile_one, jobs):
            print(json.dumps(row), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# test side


def run_worker(module: str, cap: int, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({
        "TRITON_CACHE_DIR": str(tmp_path / "triton_cache"),  # a clean cache: every spec really compiles
        "TRITON_DUMP_PTXAS_LOG": "1",
        "TRITON_DEFAULT_FP_FUSION": "1",  # the default anyway; set to silence Triton 3.9's notice
    })
    proc = subprocess.run(
        [sys.executable, __file__, module, str(cap), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, rows


def table(rows: list[dict]) -> str:
    lines = [f"{'name':44s} {'regs':>5s} {'shared':>7s} {'local':>6s} {'spill':>6s} {'s':>6s}"]
    for r in sorted(rows, key=lambda r: r["name"]):
        if r.get("error"):
            lines.append(f"{r['name']:44s} ERROR {r['error'].splitlines()[0][:120]}")
        else:
            lines.append(f"{r['name']:44s} {r['registers']:5d} {r['shared']:7d} {r['local']:6d} "
                         f"{r['spill_stores']:6d} {r['seconds']:6.1f}")
    return "\n".join(lines)


def assert_compiles_cleanly(module: str, cap: int, tmp_path: Path, shared_limit: int) -> list[dict]:
    """Compiles every spec of module for sm_cap and prints their table; asserts that each compiled,
    uses no local memory, spills nothing, fits in shared_limit bytes of shared memory and reports
    its registers. The rows, for checks of the caller's own."""
    proc, rows = run_worker(module, cap, tmp_path)
    print(f"\n{module} sm_{cap}\n{table(rows)}")
    assert rows, f"no output from the compile worker (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    errors = [r for r in rows if r.get("error")]
    assert not errors, "\n\n".join(f"{r['name']}: {r['error']}" for r in errors)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in rows:
        assert r["local"] == 0 and r["stack"] == 0, f"{r['name']} uses local memory:\n{r['ptxas_log']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['name']} spills:\n{r['ptxas_log']}"
        assert 0 <= r["shared"] <= shared_limit, \
            f"{r['name']} needs {r['shared']} B shared > sm_{cap} limit {shared_limit}"
        assert r["registers"] > 0, f"{r['name']}: cuobjdump reported no registers"
    return rows


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
