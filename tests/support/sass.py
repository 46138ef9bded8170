"""Static issue-rate ceilings of the weight-streaming kernels, read from their sm_90 SASS (issue 17;
tests/test_sass_ceiling.py).

A decode kernel streams bytes from HBM in a loop. Every SASS instruction of that loop issues once
per warp per iteration, and an SM issues at most ISSUE_SLOTS_PER_SM_PER_CYCLE warp instructions per
cycle, so the kernel can never stream faster than

    ceiling [B/s] = (slots/SM/cycle * SMs * boost clock) / (warp instructions per streamed byte)

    warp instructions per streamed byte = (body instructions per warp * warps per CTA)
                                          / (bytes of the stream one iteration moves per CTA)

A necessary bound, not a sufficient one: the issue slot is the only resource counted (MUFU, the
tensor cores, the LSU, shared-memory bandwidth and latency can bind earlier), the clock is the
maximum boost (a loaded GPU clocks lower), and every warp is assumed to run the same loop (true
of kernels without warp specialization: all of ours).

How the main loop is found (main_loop): the disassembly (nvdisasm -c) is parsed into
instructions and labels; every branch (BRA / JMP) to a label at or before itself closes a loop
whose body is [target label, branch], both included. Candidates are the loops whose body holds a
global load (LDG*, LDGSTS*, UTMALDG*, UBLKCP*): this drops the `.L_x_N: BRA .L_x_N` trap that
ptxas puts after EXIT, and any loop that moves no global data. Among the candidates the
innermost ones (containing no other candidate) are kept; more than one (disjoint streaming
loops: e.g. a loop that ptxas unrolled next to its remainder loop) is ambiguous and raised, not
guessed, and so is a chosen loop that another backward branch shares its head with (a
`continue`: the iteration is longer than the span to the first branch) or overlaps partly. The
body must also be straight-line (no other branch, CALL, EXIT or RET inside, no nested loop): its
static length is exactly the instructions a warp issues per iteration; otherwise
`Loop.straight_line` is False and the count is only an estimate (the test rejects it).

What is counted: every instruction of the body, NOPs included. ptxas pads with `NOP` and with
never-true instructions (`@!PT` / `@!UPT ...`); inside a loop body these are fetched and
dispatched like any other instruction and take an issue slot, so leaving them out would
overstate the ceiling. They are reported apart (`Loop.nop_like`): 3 to 21 per loop in the
shipped decode kernels (7% of decode attention's 309).

The streamed bytes per iteration come from the kernel's tile config (the caller knows what the
stream is: weights and their scales, or K and V), not from the SASS: a load's width says what
a thread asks for, not how many distinct HBM bytes that is (W4A16 gathers one scale per weight
element, 32x more requests than scale bytes). The widths are still the cross-check: the global
loads of the body, width x threads per CTA (LDG.E.128 = 16 B a thread, LDG.E.U16 = 2 B, LDGSTS.E
= 4 B, ...), must cover the stream the caller claims, or the loop or the claim is wrong.
TMA loads (UTMALDG / UBLKCP) move a descriptor's box, which the SASS does not show: their bytes
are unknown and the cross-check is then skipped (`Loop.load_bytes_known`).

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
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# An SM has four partitions, each with one warp scheduler and one dispatch unit of 32 threads per
# clock: at most one warp instruction per partition per clock (NVIDIA H100 Tensor Core GPU
# Architecture whitepaper, the H100 SM diagram). SM count and boost clock: pixtral_fast/hardware.py
# (H200 and H100 SXM: 132 SMs, 1.98 GHz; their datasheets' 67 TFLOP/s fp32 = 132 SMs x 128 lanes
# x 2 x 1.98 GHz).
ISSUE_SLOTS_PER_SM_PER_CYCLE = 4
GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")
_TMA_LOADS = ("UTMALDG", "UBLKCP")
_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16, "256": 32}
_BRANCHES = ("BRA", "JMP")
_CONTROL = ("BRA", "JMP", "BRX", "JMX", "EXIT", "RET", "CALL")


class SassError(ValueError):
    """The SASS has no streaming loop, or more than one candidate."""


@dataclass(frozen=True)
class Instruction:
    index: int
    offset: int | None       # byte offset within the function, where the listing gives one
    predicate: str | None    # "P0", "!P1", "!UPT", ... (None: unpredicated)
    opcode: str              # with its modifiers: "LDG.E.128", "IMAD.WIDE.U32", ...
    text: str                # the instruction as disassembled, without offset and ";"
    target: str | None       # a branch's label (or hex address), else None

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def nop_like(self) -> bool:
        """NOP or an instruction that never executes (@!PT / @!UPT): padding that still issues."""
        return self.base == "NOP" or self.predicate in ("!PT", "!UPT")

    @property
    def global_load_bytes(self) -> int | None:
        """Bytes one thread asks for from global memory (0: not a global load; None: TMA, unknown)."""
        if self.base in _TMA_LOADS:
            return None
        if self.base not in ("LDG", "LDGSTS"):
            return 0
        widths = [_WIDTHS[m] for m in self.opcode.split(".")[1:] if m in _WIDTHS]
        return widths[-1] if widths else 4


@dataclass
class Function:
    name: str
    instructions: list[Instruction]
    labels: dict[str, int]   # label (and "0x<offset>") -> index of the instruction it precedes


@dataclass
class Loop:
    label: str
    head: int                # index of the first instruction of the body
    branch: int              # index of the backward branch that closes it
    instructions: list[Instruction] = field(repr=False)
    inner_control: list[Instruction] = field(default_factory=list, repr=False)
    nested: list["Loop"] = field(default_factory=list, repr=False)

    @property
    def warp_instructions(self) -> int:
        """Instructions a warp issues per iteration (exact when straight_line)."""
        return len(self.instructions)

    @property
    def nop_like(self) -> int:
        return sum(i.nop_like for i in self.instructions)

    @property
    def straight_line(self) -> bool:
        return not self.inner_control and not self.nested

    @property
    def global_loads(self) -> list[Instruction]:
        return [i for i in self.instructions if i.base in GLOBAL_LOADS]

    @property
    def load_bytes_known(self) -> bool:
        return all(i.global_load_bytes is not None for i in self.global_loads)

    def load_bytes_per_thread(self) -> int:
        """Global-load bytes one thread requests per iteration (TMA loads not included)."""
        return sum(i.global_load_bytes or 0 for i in self.global_loads)

    def load_opcodes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in self.global_loads:
            counts[i.opcode] = counts.get(i.opcode, 0) + 1
        return counts

    def contains(self, other: "Loop") -> bool:
        return self is not other and self.head <= other.head and other.branch <= self.branch

    def excerpt(self, context: int = 3, all_lines: bool = False) -> str:
        """The body's first and last instructions (or all of them) and its global loads."""
        lines = [f"{self.label}:  ({self.warp_instructions} instructions, {self.nop_like} NOP-like)"]
        body = self.instructions
        show = set(range(len(body))) if all_lines else (
            set(range(min(context, len(body)))) | set(range(max(0, len(body) - context), len(body)))
            | {k for k, i in enumerate(body) if i.base in GLOBAL_LOADS})
        previous = -1
        for k in sorted(show):
            if k != previous + 1:
                lines.append("        ...")
            i = body[k]
            where = f"/*{i.offset:04x}*/" if i.offset is not None else ""
            pred = f"@{i.predicate} " if i.predicate else ""
            lines.append(f"  {where:>10s} {pred}{i.text}")
            previous = k
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# parsing

_FUNCTION = re.compile(r"^\s*(?://-+\s*\.text\.(\S+)\s*-+|Function\s*:\s*(\S+))")
_LABEL = re.compile(r"^\s*(\.?[A-Za-z_$][\w$.]*):\s*$")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@(!?U?P(?:T|\d+))\s+")
_TARGET = re.compile(r"`?\(\s*([\w.$]+)\s*\)`?|\b(0x[0-9a-fA-F]+)\b")


def parse(text: str) -> list[Function]:
    """The functions of an nvdisasm or cuobjdump -sass listing, in order."""
    functions: list[Function] = []
    current: Function | None = None
    pending: list[str] = []
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = Function(m.group(1) or m.group(2), [], {})
            functions.append(current)
            pending = []
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        if current is None:  # a listing without function headers: one anonymous function
            current = Function("", [], {})
            functions.append(current)
        offset, body = int(m.group(1), 16), m.group(2).strip()
        predicate = None
        p = _PRED.match(body)
        if p:
            predicate, body = p.group(1), body[p.end():]
        opcode = body.split()[0] if body else ""
        target = None
        if opcode.split(".")[0] in _CONTROL:
            t = _TARGET.search(body[len(opcode):])
            if t:
                target = t.group(1) or hex(int(t.group(2), 16))
        index = len(current.instructions)
        for label in pending:
            current.labels[label] = index
        pending = []
        current.labels[hex(offset)] = index  # cuobjdump branches to addresses
        current.instructions.append(Instruction(index, offset, predicate, opcode, body, target))
    return [f for f in functions if f.instructions]


def loops(function: Function) -> list[Loop]:
    """Every backward branch's loop, in the order of their branches, with what lies inside."""
    found = []
    for ins in function.instructions:
        if ins.base not in _BRANCHES or ins.target is None:
            continue
        head = function.labels.get(ins.target)
        if head is None or head > ins.index:
            continue
        label = next((k for k, v in function.labels.items() if v == head and not k.startswith("0x")),
                     ins.target)
        body = function.instructions[head:ins.index + 1]
        found.append(Loop(label, head, ins.index, body,
                          inner_control=[i for i in body[:-1] if i.base in _CONTROL]))
    for loop in found:
        loop.nested = [other for other in found if loop.contains(other)]
    return found


def main_loop(function: Function) -> Loop:
    """The innermost loop that loads from global memory; SassError where there is none or where
    several disjoint ones qualify (see the module's docstring)."""
    candidates = [l for l in loops(function) if l.global_loads]
    if not candidates:
        raise SassError(f"{function.name or 'kernel'}: no loop loads from global memory "
                        f"({len(loops(function))} backward branches, none around a global load)")
    innermost = [l for l in candidates if not any(l.contains(o) for o in candidates)]
    if len(innermost) > 1:
        raise SassError(f"{function.name or 'kernel'}: {len(innermost)} disjoint loops load from global "
                        "memory; which one streams is ambiguous:\n\n"
                        + "\n\n".join(l.excerpt() for l in innermost))
    chosen = innermost[0]
    for other in loops(function):
        same_head = other.head == chosen.head and other.branch != chosen.branch
        partial = (other.head < chosen.head <= other.branch < chosen.branch
                   or chosen.head < other.head <= chosen.branch < other.branch)
        if same_head or partial:
            raise SassError(f"{function.name or 'kernel'}: the streaming loop {chosen.label} "
                            f"{'shares its head with' if same_head else 'overlaps'} the loop closed at "
                            f"/*{other.instructions[-1].offset or 0:04x}*/: its iteration is not one span:\n"
                            + chosen.excerpt())
    return chosen


def kernel(text: str, name: str | None = None) -> Function:
    """The one function of a listing (Triton's cubins hold one), or the one called `name`."""
    functions = parse(text)
    if name is not None:
        functions = [f for f in functions if f.name == name]
    if len(functions) != 1:
        raise SassError(f"expected one function{' ' + name if name else ''}, found "
                        f"{[f.name for f in functions]}")
    return functions[0]


# ---------------------------------------------------------------------------------------------
# the ceiling


@dataclass(frozen=True)
class Ceiling:
    warp_instructions: int         # per warp per iteration
    warps: int                     # per CTA
    stream_bytes: float            # streamed from HBM per iteration per CTA
    load_bytes: int | None         # global-load bytes the CTA's threads request per iteration (None: TMA)
    issue_rate: float              # warp instructions per second, whole GPU

    @property
    def instructions_per_byte(self) -> float:
        return self.warp_instructions * self.warps / self.stream_bytes

    @property
    def bytes_per_s(self) -> float:
        return self.issue_rate / self.instructions_per_byte


def issue_rate(gpu) -> float:
    """Warp instructions per second the whole GPU can issue (gpu: a pixtral_fast.hardware.GpuSpec)."""
    return ISSUE_SLOTS_PER_SM_PER_CYCLE * gpu.sms * gpu.boost_hz


def ceiling(loop: Loop, warps: int, stream_bytes: float, gpu) -> Ceiling:
    """The issue-bound streaming rate of `loop` run by CTAs of `warps` warps that move
    `stream_bytes` of the stream per iteration. SassError where the body's global loads request
    fewer bytes than that (the wrong loop, or a wrong claim of what it streams)."""
    if stream_bytes <= 0:
        raise ValueError(f"stream_bytes must be > 0, got {stream_bytes}")
    load_bytes = loop.load_bytes_per_thread() * 32 * warps if loop.load_bytes_known else None
    if load_bytes is not None and load_bytes < stream_bytes:
        raise SassError(f"the loop's global loads request {load_bytes} B per CTA per iteration, fewer than "
                        f"the {stream_bytes} B it is said to stream:\n{loop.excerpt()}")
    return Ceiling(loop.warp_instructions, warps, stream_bytes, load_bytes, issue_rate(gpu))


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
