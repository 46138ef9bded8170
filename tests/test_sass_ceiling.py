"""Issue 17: every decode-form kernel that streams weights (or the KV cache) must be bound by HBM
bandwidth, not by instruction issue. From the sm_90 SASS of each, compiled ahead of time as the
JIT compiles it at the decode shape: warp instructions per main-loop iteration x warps / bytes
streamed per iteration = instructions per byte; the H200's issue rate (4 warp instructions per
cycle per SM x 132 SMs x 1.98 GHz) over that is the bandwidth at which issue saturates. It must
be at least twice the H200's 4.8 TB/s. How the loop is found and what is counted:
tests/support/sass.py. The table is printed at the end of `make test` and, with
PIXTRAL_FAST_SASS_TABLE=FILE, written as JSON for the benchmark report (bench/sass_table.py formats it).

Decode shape: Pixtral-12B's text decoder (hidden 5120, FFN 14336, 32 query / 8 KV heads of 128),
batch 1 on 132 SMs, the FFN's gate/up projection (N 14336, K 5120) for the linears, KV pages of
16 tokens and a block table sized for the default 131072-token context for attention.
What each kernel streams per iteration and CTA: W4A16, the packed int4 tile and its scales
(BLOCK_N x BLOCK_K / group_size of them); FP8, the e4m3 tile (per-channel scales are read once,
after the loop); the gated FFN, its two weight tiles; decode attention, the K and V tiles. The
activations are not counted: every CTA of a column re-reads them from L2.

W4A16 is measured on its k128 kernel (weights repacked at load; kernels/w4a16_linear.py): groups of
128 pass; groups of 32 and 64 still fall short (strict xfails: the change that fixes one fails here
until its mark is removed). FP8 passes since its rewrite (hardware e4m3 conversion, unmasked
16 x 128 x 256 tiles).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import triton

from bench.sass_table import lines as table_lines
from pixtral_fast import hardware
from pixtral_fast.kernels import _quant_linear, decode_attention, fp8_linear, gated_ffn, w4a16_linear
from tests.support import sass, sass_compile, tables

CAP = 90
GPU = hardware.H200
TARGET = 2 * GPU.hbm_bytes_per_s
HIDDEN, FFN, KV_HEADS, HEAD_DIM = 5120, 14336, 8, 128
BATCH = 1
PAGE, MAX_CONTEXT = 16, 131072
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "u8": 1, "i32": 4}


@dataclass(frozen=True)
class Case:
    name: str
    module: str
    spec: dict              # the shipped spec (its constexprs give the tiles)
    values: dict            # the int arguments at the decode shape
    stream_bytes: float     # streamed per main-loop iteration per CTA
    config: str
    xfail: str | None = None

    def job(self) -> dict:
        return {"module": self.module, "spec": self.spec["name"], "values": self.values, "name": self.name}


def _one(module, pick) -> dict:
    specs = [s for s in module.compile_specs(CAP) if pick(s)]
    assert len(specs) == 1, [s["name"] for s in specs]
    return specs[0]


def _itemsize(spec, arg) -> int:
    return ITEMSIZE[spec["signature"][arg].lstrip("*")]


def _tiles(c) -> str:
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"


def _quant_case(module, family, stream, name, xfail, group_size=None) -> Case:
    # W4A16 ships two variants per form (the scales' row stride divisible by 16 or not, `_sn16`):
    # specialize() below sets the attrs from the decode shape's values, so either gives the same kernel.
    if family == "w4a16k128":  # one decode spec per scale grouping: `_c1` (groups of 32), `_c2` (64), none (128)
        cps = w4a16_linear.chunks_per_scale(group_size, HIDDEN)
        spec = _one(module, lambda s: s["name"].startswith(f"{family}_decode_bf16_")
                    and s["constexprs"]["CPS"] == cps)
    else:
        spec = _one(module, lambda s: s["name"].startswith(f"{family}_decode_bf16_") and not s["name"].endswith("_sn16"))
    c = spec["constexprs"]
    m_tiles, n_tiles = triton.cdiv(BATCH, c["BLOCK_M"]), triton.cdiv(FFN, c["BLOCK_N"])
    split, k_per_split = _quant_linear.plan_split(m_tiles, n_tiles, HIDDEN, c["BLOCK_K"], 2 * GPU.sms)
    values = {"M": BATCH, "N": FFN, "K": HIDDEN, "stride_xm": HIDDEN, "k_per_split": k_per_split,
              "stride_split": BATCH * FFN}
    if family == "w4a16":
        values |= {"stride_wn": triton.cdiv(HIDDEN, 8), "stride_sn": HIDDEN // group_size, "group_size": group_size}
    elif family == "w4a16k128":  # the k128 layout: int16 halfwords per row, scales [K / group, N]
        values |= {"stride_wn": triton.cdiv(HIDDEN, 128) * 32, "n_groups": HIDDEN // group_size,
                   "gs_shift": group_size.bit_length() - 1}
    else:
        values |= {"stride_wn": HIDDEN}
    return Case(name, module.__name__.rsplit(".", 1)[1], spec, values, stream(spec, c),
                f"{_tiles(c)} w{spec['num_warps']}s{spec['num_stages']} split{split}", xfail)


def _cases() -> list[Case]:
    cases = []
    for gs in (32, 64, 128):
        def w4a16_stream(s, c, gs=gs):  # packed int4 tile + its scales
            return c["BLOCK_N"] * c["BLOCK_K"] // 2 + c["BLOCK_N"] * c["BLOCK_K"] / gs * _itemsize(s, "s_ptr")

        cases.append(_quant_case(
            w4a16_linear, "w4a16k128", w4a16_stream, f"w4a16_decode_bf16_g{gs}",
            f"issue 17: issue-bound at {W4A16_MEASURED[gs]} TB/s (< 9.6): per-group fp32 scaling of the "
            "16-row accumulator -- more work pending" if W4A16_MEASURED[gs] else None, gs))
    cases.append(_quant_case(
        fp8_linear, "fp8", lambda s, c: c["BLOCK_N"] * c["BLOCK_K"], "fp8_decode_bf16_per_channel", None))
    for spec in gated_ffn.compile_specs(CAP):  # the decode candidates: tiles of at most 32 rows
        c = spec["constexprs"]
        if spec["name"].startswith("gated_bf16_") and c["BLOCK_M"] <= 32:
            values = {"M": BATCH, "N": FFN, "K": HIDDEN, "stride_xm": HIDDEN, "stride_wn": HIDDEN,
                      "M_BUCKET": gated_ffn._m_bucket(BATCH)}
            cases.append(Case(spec["name"], "gated_ffn", spec, values,
                              2 * c["BLOCK_N"] * c["BLOCK_K"] * _itemsize(spec, "wg_ptr"),
                              f"{_tiles(c)} w{spec['num_warps']}s{spec['num_stages']}"))
    for direct in (False, True):
        spec = _one(decode_attention, lambda s: s["name"].startswith(f"decode_split_bf16_d{HEAD_DIM}_")
                    and s["constexprs"]["DIRECT"] == direct)
        c = spec["constexprs"]
        splits = 1 if direct else decode_attention.choose_num_splits(BATCH, KV_HEADS, MAX_CONTEXT, c["BLOCK_N"],
                                                                      GPU.sms)
        values = {"block_table_stride": MAX_CONTEXT // PAGE, "num_kv_heads": KV_HEADS, "num_splits": splits}
        cases.append(Case(spec["name"], "decode_attention", spec, values,
                          2 * c["BLOCK_N"] * c["HEAD_DIM"] * _itemsize(spec, "k_ptr"),
                          f"n{c['BLOCK_N']} d{c['HEAD_DIM']} w{spec['num_warps']}s{spec['num_stages']} "
                          f"splits{splits}"))
    return cases


# The ceilings this file measured on the shipped kernels (Triton 3.9, its ptxas 13.1), for the
# xfail reasons (None: passes): the W4A16 k128 kernel, 682 (g32) and 552 (g64) warp instructions per
# 16 x 256 x 128 iteration (g128: 905 per 16 x 256 x 256, 9.76 TB/s). The kernel that reads the
# checkpoint's layout (still shipped for other group sizes) was at 0.99-1.08 TB/s, 558 per 4.1-4.5
# KiB iteration. (FP8 was 630 per 8 KiB, 1.70 TB/s, before its rewrite.)
W4A16_MEASURED = {32: "7.06", 64: "8.24", 128: None}
CASES = _cases()


def _gemv_case() -> Case:
    """Issue 17, item 4: the bf16 split-K GEMV at the output head (N 131072, K 5120, the largest
    single weight read), batch 1; it streams the [BLOCK_N, BLOCK_K] bf16 weight tile."""
    import torch

    from pixtral_fast.kernels import gemv

    c, values, split = gemv.launch_values("head", BATCH, CAP, torch.bfloat16)
    spec = _one(gemv, lambda s: s["name"].startswith("gemv_bf16_head_m1_"))
    return Case("gemv_bf16_output_head", "gemv", spec, values, c["BLOCK_N"] * c["BLOCK_K"] * _itemsize(spec, "w_ptr"),
                f"{_tiles(c)} w{spec['num_warps']}s{spec['num_stages']} split{split}")


CASES.append(_gemv_case())
MERGE = _one(decode_attention, lambda s: s["name"] == f"decode_merge_bf16_d{HEAD_DIM}")


def _row(case: Case, compiled: dict) -> dict:
    row = {"kernel": case.name, "spec": case.spec["name"], "config": case.config, "values": case.values,
           "expected_to_fail": case.xfail is not None}
    if compiled.get("error"):
        return {**row, "error": compiled["error"]}
    listing = sass_compile.disassemble(Path(compiled["cubin"]).read_bytes())
    try:
        loop = sass.main_loop(sass.kernel(listing))
        c = sass.ceiling(loop, compiled["num_warps"], case.stream_bytes, GPU)
    except sass.SassError as exc:
        return {**row, "error": f"SassError: {exc}"}
    return {**row, "registers": compiled["registers"], "specialized": compiled["specialized"],
            "loop": {"label": loop.label, "first": hex(loop.instructions[0].offset),
                     "branch": hex(loop.instructions[-1].offset), "straight_line": loop.straight_line,
                     "global_loads": loop.load_opcodes(), "excerpt": loop.excerpt()},
            "warp_instr_per_iter": loop.warp_instructions, "nop_like_per_iter": loop.nop_like,
            "warps": c.warps, "stream_bytes_per_iter": c.stream_bytes, "load_bytes_per_iter": c.load_bytes,
            "instr_per_byte": c.instructions_per_byte, "ceiling_bytes_per_s": c.bytes_per_s,
            "verdict": ("ok" if c.bytes_per_s >= TARGET else "BELOW 2x HBM")
            + (" (xfail: rewrite pending)" if case.xfail else "")}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sass")
    start = time.perf_counter()
    merge_job = {"module": "decode_attention", "spec": MERGE["name"], "name": MERGE["name"],
                 "values": {"num_splits": decode_attention.MAX_SPLITS}}
    proc, compiled = sass_compile.compile_kernels([case.job() for case in CASES] + [merge_job], CAP, tmp)
    assert compiled, f"no output from the compile worker (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = {case.name: _row(case, compiled.get(case.name, {"error": "not compiled"})) for case in CASES}
    table = {"gpu": GPU.name, "issue_rate_warp_instr_per_s": sass.issue_rate(GPU),
             "hbm_bytes_per_s": GPU.hbm_bytes_per_s, "target_bytes_per_s": TARGET,
             "seconds": round(time.perf_counter() - start, 1), "rows": list(rows.values())}
    tables.publish("sass_ceilings", table_lines(table) + [f"({table['seconds']} s)"], table)
    if os.environ.get("PIXTRAL_FAST_SASS_TABLE"):
        Path(os.environ["PIXTRAL_FAST_SASS_TABLE"]).write_text(json.dumps(table, indent=2) + "\n")
    return {"rows": rows, "compiled": compiled, "proc": proc}


class BelowTarget(AssertionError):
    """The one failure an xfail of this file admits: any other (a compile error, a loop the
    reader cannot count) fails the test even where the kernel is expected to fall short."""


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, raises=BelowTarget, reason=c.xfail)]
                 if c.xfail else []) for c in CASES])
def test_issue_ceiling_at_least_twice_hbm(case, measured):
    row = measured["rows"][case.name]
    assert not row.get("error"), f"{case.name}: {row['error']}"
    assert row["loop"]["straight_line"], \
        f"{case.name}: the main loop has inner branches or loops, its count is not exact:\n{row['loop']['excerpt']}"
    if row["ceiling_bytes_per_s"] < TARGET:
        raise BelowTarget(
            f"{case.name} ({row['config']}): {row['warp_instr_per_iter']} warp instructions x {row['warps']} "
            f"warps per iteration for {row['stream_bytes_per_iter']:.0f} B = {row['instr_per_byte']:.4f} instr/B: "
            f"issue saturates at {row['ceiling_bytes_per_s'] / 1e12:.2f} TB/s < {TARGET / 1e12:.1f}\n"
            f"{row['loop']['excerpt']}")


def test_merge_kernel_has_no_streaming_loop(measured):
    """The split merge reads each head's partials once (no loop): it is not held to the ceiling,
    and the SASS reader says so rather than picking some other backward branch."""
    compiled = measured["compiled"][MERGE["name"]]
    assert not compiled.get("error"), compiled["error"]
    function = sass.kernel(sass_compile.disassemble(Path(compiled["cubin"])))
    with pytest.raises(sass.SassError, match="no loop loads from global memory"):
        sass.main_loop(function)


# ---------------------------------------------------------------------------------------------
# the SASS reader on hand-written listings

NVDISASM = """
//--------------------- .text.k       --------------------------
        .section        .text.k,"ax",@progbits
k:
.text.k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
        /*0020*/                   NOP ;
.L_x_1:
        /*0030*/                   IMAD.WIDE R4, R2, 0x2, R6 ;
        /*0040*/               @P1 LDG.E.128 R8, desc[UR4][R4.64] ;
        /*0050*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64+0x10] ;
        /*0060*/                   LDG.E.U16 R12, desc[UR4][R10.64] ;
        /*0070*/                   @!UPT UIADD3 URZ, URZ, URZ, URZ ;
        /*0080*/                   HMMA.16816.F32.BF16 R20, R8, R12, R20 ;
        /*0090*/                   ISETP.GE.AND P1, PT, R2, R9, PT ;
        /*00a0*/              @!P1 BRA `(.L_x_1) ;
.L_x_0:
        /*00b0*/                   STG.E desc[UR4][R4.64], R20 ;
        /*00c0*/                   EXIT ;
.L_x_2:
        /*00d0*/                   BRA `(.L_x_2);
        /*00e0*/                   NOP;
"""


def _listing(body: str, prologue: str = "", epilogue: str = "") -> str:
    """A one-function nvdisasm listing: offsets numbered in order."""
    lines, offset = ["//--------------------- .text.k --------------------------"], 0
    for line in (prologue + body + epilogue).strip().splitlines():
        line = line.strip()
        if line.endswith(":"):
            lines.append(line)
        else:
            lines.append(f"        /*{offset:04x}*/    {line} ;")
            offset += 16
    return "\n".join(lines)


def test_int_specialization_is_tritons():
    """The worker specializes ints by our copy of the JIT's rule; here it is checked against
    Triton's own (a private function: skipped where this Triton lacks it)."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    for value in (0, 1, 2, 8, 15, 16, 40, 48, 5120, 14336, -16, 2**33):
        for spec, align in ((True, True), (True, False), (False, True)):
            kind, key = native_specialize_impl(BaseBackend, value, False, spec, align)
            theirs = "constexpr" if kind == "constexpr" else (key or "")
            assert sass_compile.jit_int_specialization(value, spec, align) == theirs, (value, spec, align)


def test_reader_counts_the_loop_body():
    function = sass.kernel(NVDISASM)
    assert function.name == "k" and len(function.instructions) == 15
    assert [(l.label, l.warp_instructions) for l in sass.loops(function)] == [(".L_x_1", 8), (".L_x_2", 1)]
    loop = sass.main_loop(function)
    assert (loop.label, loop.warp_instructions, loop.nop_like, loop.straight_line) == (".L_x_1", 8, 1, True)
    assert loop.instructions[0].opcode == "IMAD.WIDE" and loop.instructions[-1].text == "BRA `(.L_x_1)"
    assert loop.load_opcodes() == {"LDG.E.128": 1, "LDGSTS.E.BYPASS.LTC128B.128": 1, "LDG.E.U16": 1}
    assert loop.load_bytes_per_thread() == 16 + 16 + 2
    # 8 instructions x 4 warps per 1024 B: 1/32 instr/B; (16 + 16 + 2) x 128 threads >= 1024 B
    c = sass.ceiling(loop, 4, 1024, GPU)
    assert c.instructions_per_byte == pytest.approx(1 / 32)
    assert c.bytes_per_s == pytest.approx(4 * 132 * 1.98e9 * 32)
    assert c.load_bytes == 34 * 128
    with pytest.raises(sass.SassError, match="fewer than"):
        sass.ceiling(loop, 4, 34 * 128 + 1, GPU)


def test_reader_takes_cuobjdump_listings():
    text = """
        Function : k
        /*0000*/                   MOV R2, RZ ;          /* 0x000000ff00027202 */
                                                          /* 0x000fe20000000f00 */
        /*0010*/                   LDG.E.64 R4, desc[UR4][R6.64] ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   EXIT ;
        /*0050*/                   BRA 0x50;
    """
    loop = sass.main_loop(sass.kernel(text))
    assert (loop.warp_instructions, loop.load_bytes_per_thread()) == (3, 8)


def test_reader_load_widths():
    widths = {"LDG.E": 4, "LDG.E.U8": 1, "LDG.E.S16": 2, "LDG.E.64": 8, "LDG.E.128.CONSTANT": 16,
              "LDG.E.EL.LTC128B.128": 16, "LDGSTS.E": 4, "LDGSTS.E.BYPASS.128": 16, "LDGSTS.E.64.ZFILL": 8,
              "LDS.U.128": 0, "STG.E.128": 0, "UTMALDG.2D": None}
    for opcode, width in widths.items():
        assert sass.Instruction(0, 0, None, opcode, opcode, None).global_load_bytes == width, opcode


def test_reader_picks_the_innermost_streaming_loop():
    text = _listing("""
        .L_outer:
        IADD3 R1, R1, 0x1, RZ
        .L_inner:
        LDG.E.128 R4, desc[UR4][R2.64]
        FFMA R8, R4, R5, R8
        @P0 BRA `(.L_inner)
        LDG.E R9, desc[UR4][R2.64]
        @P1 BRA `(.L_outer)
        EXIT
    """)
    loop = sass.main_loop(sass.kernel(text))
    assert (loop.label, loop.warp_instructions, loop.straight_line) == (".L_inner", 3, True)
    outer = [l for l in sass.loops(sass.kernel(text)) if l.label == ".L_outer"][0]
    assert outer.nested and not outer.straight_line


def test_reader_flags_a_loop_whose_count_is_not_exact():
    """A loop with a load-free loop inside, or a forward branch inside: chosen, but not straight-line."""
    nested = _listing("""
        .L_a:
        LDG.E.128 R4, desc[UR4][R2.64]
        .L_b:
        FFMA R8, R4, R5, R8
        @P0 BRA `(.L_b)
        @P1 BRA `(.L_a)
        EXIT
    """)
    loop = sass.main_loop(sass.kernel(nested))
    assert loop.label == ".L_a" and not loop.straight_line
    branchy = _listing("""
        .L_a:
        LDG.E.128 R4, desc[UR4][R2.64]
        @P2 BRA `(.L_skip)
        FFMA R8, R4, R5, R8
        .L_skip:
        @P1 BRA `(.L_a)
        EXIT
    """)
    loop = sass.main_loop(sass.kernel(branchy))
    assert loop.warp_instructions == 4 and [i.base for i in loop.inner_control] == ["BRA"]
    assert not loop.straight_line


def test_reader_rejects_a_kernel_without_a_streaming_loop():
    no_loop = _listing("""
        LDG.E.128 R4, desc[UR4][R2.64]
        STG.E.128 desc[UR4][R6.64], R4
        EXIT
        .L_trap:
        BRA `(.L_trap)
    """)
    with pytest.raises(sass.SassError, match="no loop loads from global memory"):
        sass.main_loop(sass.kernel(no_loop))
    load_free_loop = _listing("""
        LDG.E.128 R4, desc[UR4][R2.64]
        .L_a:
        FFMA R8, R4, R5, R8
        @P0 BRA `(.L_a)
        EXIT
    """)
    with pytest.raises(sass.SassError, match="no loop loads from global memory"):
        sass.main_loop(sass.kernel(load_free_loop))


def test_reader_refuses_to_guess_between_two_streaming_loops():
    text = _listing("""
        .L_a:
        LDG.E.128 R4, desc[UR4][R2.64]
        @P0 BRA `(.L_a)
        .L_b:
        LDG.E R4, desc[UR4][R2.64]
        @P1 BRA `(.L_b)
        EXIT
    """)
    with pytest.raises(sass.SassError, match="2 disjoint loops"):
        sass.main_loop(sass.kernel(text))


def test_reader_refuses_a_loop_with_two_back_edges():
    """A `continue`: two backward branches to one head. The span to the first is not an iteration."""
    text = _listing("""
        .L_a:
        LDG.E.128 R4, desc[UR4][R2.64]
        @P0 BRA `(.L_a)
        FFMA R8, R4, R5, R8
        @P1 BRA `(.L_a)
        EXIT
    """)
    with pytest.raises(sass.SassError, match="shares its head"):
        sass.main_loop(sass.kernel(text))
