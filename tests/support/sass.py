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
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

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
