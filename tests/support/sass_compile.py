"""Compiling the kernels whose SASS tests/support/sass.py reads (tests/test_sass_ceiling.py).

Compiling: `compile_kernels` runs this file as a script in a subprocess without TRITON_INTERPRET
(the interpreter and the compiler cannot share a process; DESIGN §5) and compiles named specs of
the modules' `compile_specs(cap)` with tests/support/kernel_compile.py's own worker (`_compile_one`:
same options; cubin, registers, spills). One change: each spec is specialized as Triton's JIT
specializes it at launch for given argument values (the decode shape), `specialize`: the specs'
own `attrs` are a hand-written claim of the same, and where it misses one (an int the JIT finds
divisible by 16, a pointer's alignment) the SASS is that of a kernel that never runs: W4A16's
loop is 1086 instructions with its spec's attrs and 558 as launched at the decode shape, decode
attention's (a spec without attrs) 1361 and 309.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


# ---------------------------------------------------------------------------------------------
# disassembly and compilation


def tool(name: str) -> str:
    """nvdisasm / cuobjdump: the ones bundled with Triton (this machine's CUDA toolkit has neither),
    else the CUDA toolkit's."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.is_file():
        return str(bundled)
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).is_file():
            return str(Path(root) / "bin" / name)
    return name


def disassemble(cubin: bytes | Path) -> str:
    """The SASS of a cubin (a file, or the bytes of `compiled.asm["cubin"]`), with labels."""
    if isinstance(cubin, (bytes, bytearray)):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return disassemble(Path(f.name))
    return subprocess.run([tool("nvdisasm"), "-c", str(cubin)], check=True, capture_output=True,
                          text=True).stdout


def _kernel_compile():
    """tests/support/kernel_compile.py: as a sibling when this file runs as a script, else as a package."""
    if __package__:
        from tests.support import kernel_compile
    else:
        import kernel_compile  # sys.path[0] is this folder
    return kernel_compile


def jit_int_specialization(value: int, specialize: bool = True, align: bool = True) -> str:
    """What Triton's JIT makes of an int argument at launch: "constexpr" (equal to 1: compiled in),
    "D" (divisible by 16: tt.divisibility 16) or "" (BaseBackend.get_int_specialization and
    native_specialize_impl of Triton 3.9; tests check the two agree). specialize / align: False
    for arguments marked do_not_specialize / do_not_specialize_on_alignment."""
    if not specialize:
        return ""
    if value == 1:
        return "constexpr"
    return "D" if align and value % 16 == 0 else ""


def specialize(spec: dict, values: dict, name: str) -> dict:
    """`spec` as Triton's JIT compiles it when launched with these argument values: every pointer
    16-byte aligned (torch's caching allocator hands out 512-byte aligned blocks, and the decode
    kernels get whole tensors), every int as jit_int_specialization says, floats never, the
    arguments marked do_not_specialize(_on_alignment) left alone. The spec's own `attrs` (its
    claim of the same) are replaced. values: every int argument of the signature. Needs the
    compiled (not interpreted) kernel, whose `params` carry the do_not_specialize marks."""
    params = {p.name: p for p in spec["fn"].params}
    signature, constexprs, attrs = dict(spec["signature"]), dict(spec["constexprs"]), {}
    # a value the spec already compiles in (an int of 1 the JIT made a constexpr) needs nothing more
    values = {k: v for k, v in values.items() if not (signature.get(k) == "constexpr" and constexprs.get(k) == v)}
    unknown = set(values) - {k for k, t in signature.items() if t != "constexpr"}
    if unknown:
        raise KeyError(f"{name}: values for arguments that are not runtime arguments: {sorted(unknown)}")
    for arg, ty in spec["signature"].items():
        p = params[arg]
        dns = getattr(p, "do_not_specialize", False)
        dns_align = getattr(p, "do_not_specialize_on_alignment", False)
        if ty == "constexpr" or ty.startswith(("fp", "bf")):
            continue
        if ty.startswith("*"):
            if not (dns or dns_align):
                attrs[arg] = [["tt.divisibility", 16]]
            continue
        if arg not in values:
            raise KeyError(f"{name}: no value for the int argument {arg}")
        kind = jit_int_specialization(values[arg], not dns, not dns_align)
        if kind == "constexpr":
            signature[arg], constexprs[arg] = "constexpr", values[arg]
        elif kind == "D":
            attrs[arg] = [["tt.divisibility", 16]]
    return {**spec, "name": name, "signature": signature, "constexprs": constexprs, "attrs": attrs}


def _worker(out_dir: str, cap: int, jobs: list[dict]) -> int:
    """Compiles each job (module, spec, values, name: see compile_kernels), two at a time, with
    kernel_compile's own worker, printing one JSON row per job: kernel_compile's row plus the
    specialized spec's num_warps, constexprs, attrs and the cubin's path."""
    import importlib
    import multiprocessing

    kc = _kernel_compile()
    tasks, meta = [], {}
    for module in dict.fromkeys(job["module"] for job in jobs):
        mod = importlib.import_module(f"pixtral_fast.kernels.{module}")
        shipped = mod.compile_specs(cap)
        by_name = {s["name"]: s for s in shipped}
        extra = []
        for job in (j for j in jobs if j["module"] == module):
            try:
                if job["spec"] not in by_name:
                    raise KeyError(f"no spec {job['spec']} in {module}.compile_specs({cap}): {sorted(by_name)}")
                spec = specialize(by_name[job["spec"]], job["values"], job["name"])
            except Exception as exc:
                print(json.dumps({"name": job["name"], "error": f"{type(exc).__name__}: {exc}"}), flush=True)
                continue
            tasks.append((module, cap, len(shipped) + len(extra), out_dir))
            extra.append(spec)
            meta[spec["name"]] = {
                "module": module, "spec": job["spec"], "num_warps": spec["num_warps"],
                "num_stages": spec["num_stages"], "constexprs": spec["constexprs"],
                "specialized": {"divisible_by_16": sorted(spec["attrs"]),
                                "constants": {k: v for k, v in spec["constexprs"].items()
                                              if k not in by_name[job["spec"]]["constexprs"]}},
                "cubin": str(Path(out_dir) / f"{spec['name']}_sm{cap}.cubin")}
        # kernel_compile's worker looks its spec up by index in compile_specs(cap): the specialized
        # specs follow the shipped ones (this process and its forks only).
        mod.compile_specs = lambda c, _shipped=mod.compile_specs, _extra=tuple(extra): _shipped(c) + list(_extra)
    if tasks:
        with multiprocessing.get_context("fork").Pool(min(kc.WORKERS, len(tasks))) as pool:
            for row in pool.imap_unordered(kc._compile_one, tasks):
                print(json.dumps({**meta.get(row["name"], {}), **row}), flush=True)
    return 0


def compile_kernels(jobs: list[dict], cap: int, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Compiles for sm_cap, in a subprocess without TRITON_INTERPRET, each job
    {"module": "w4a16_linear", "spec": <a name from its compile_specs(cap)>, "values": {int
    argument: value at the decode shape}, "name": <a name of its own>}, specialized as the JIT
    would for those values (`specialize`). Returns (the process, {name: row}); a row has
    kernel_compile's fields (error, registers, shared, local, spills, ptxas_log, seconds) and
    module, spec, num_warps, num_stages, constexprs, specialized and cubin (its path)."""
    kc = _kernel_compile()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"TRITON_CACHE_DIR": str(tmp_path / "triton_cache"), "TRITON_DUMP_PTXAS_LOG": "1",
                "TRITON_DEFAULT_FP_FUSION": "1"})
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(cap), json.dumps(jobs)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=kc.TIMEOUT_S)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, {r["name"]: r for r in rows}


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])))
