"""FP8 e4m3 casts under Triton's interpreter, as the package alone installs its fix
(kernels/_interpreter.py): a fresh `python -c` that never imports tests/ runs one cast kernel
(`tl.load`, `.to(dst)`, `tl.store`) over
  * every finite e4m3 code -> fp32, bf16, fp16 (exact on a GPU: each is a value of all three);
  * every bf16 and every fp16 bit pattern within +-448, and random fp32, -> e4m3: round to
    nearest, ties to even (every tie and every carry into the exponent among them);
and compares the bits with torch's own conversions. Past +-448 a GPU's `cvt.rn.satfinite`
saturates (torch gives NaN there), so those are checked against 448 itself.
"""
import textwrap

import numpy as np
import torch

from tests.support.interpreted import run_interpreted

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, triton, triton.language as tl
    from pixtral_fast.kernels import _interpreter
    assert not any(m == "tests" or m.startswith("tests.") for m in sys.modules), "tests/ was imported"

    @triton.jit
    def cast(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=ok).to(dst.dtype.element_ty), mask=ok)

    def run(src, dtype):
        out = torch.empty(src.numel(), dtype=dtype)
        cast[(triton.cdiv(src.numel(), 4096),)](src, out, src.numel(), BLOCK=4096)
        return out

    def bits(t):
        return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)

    E4M3 = torch.float8_e4m3fn
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3)
    finite = codes[~torch.isnan(codes.float())]
    report = {"shim_installed": _interpreter.installed(), "finite_codes": finite.numel()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        report[f"e4m3_to_{name}"] = int((bits(run(finite, dtype)) != bits(finite.to(dtype))).sum())

    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        values = patterns.view(dtype)
        values = values[values.float().abs() <= 448]
        report[f"{name}_count"] = values.numel()
        report[f"{name}_to_e4m3"] = int((bits(run(values, E4M3)) != bits(values.to(E4M3))).sum())
    g = torch.Generator().manual_seed(0)
    scale = torch.exp2(torch.randint(-14, 9, (50000,), generator=g).float())  # subnormals to the top
    values = (torch.randn(50000, generator=g) * scale).clamp(-448, 448)
    report["fp32_to_e4m3"] = int((bits(run(values, E4M3)) != bits(values.to(E4M3))).sum())
    beyond = torch.tensor([449.0, 464.0, 1e6, float("inf"), -500.0, -float("inf")])
    report["saturated"] = run(beyond, E4M3).float().tolist()
    report["nan_stays_nan"] = bool(torch.isnan(run(torch.tensor([float("nan")]), E4M3).float()).all())
    print(json.dumps(report))
""")


def test_e4m3_casts_match_torch_in_every_direction(tmp_path):
    report = run_interpreted(SCRIPT, tmp_path)
    assert report.pop("shim_installed") is True
    assert report.pop("finite_codes") == 254
    assert report.pop("bf16_count") > 30000 and report.pop("fp16_count") > 40000  # all of them, both signs
    assert report.pop("saturated") == [448.0, 448.0, 448.0, 448.0, -448.0, -448.0]
    assert report.pop("nan_stays_nan") is True
    mismatches = {k: v for k, v in report.items() if v != 0}
    assert not mismatches and len(report) == 6, f"casts whose bits differ from torch's: {report}"


def test_e4m3_helpers_round_ties_to_even_and_decode_every_code():
    """The numpy helpers alone: the table is torch's decoding of all 256 codes (NaN where torch
    has NaN), and the encoder's ties (1 + 1/16 -> 1, 1 + 3/16 -> 1.25, 2^-10 -> 0, 3 * 2^-10 ->
    2^-8, 1.9375 -> 2 with the carry) and signed zero are torch's."""
    from pixtral_fast.kernels._interpreter import e4m3_bits_to_fp32, float_to_e4m3_bits

    codes = torch.arange(256, dtype=torch.uint8)
    table = torch.from_numpy(e4m3_bits_to_fp32(codes.numpy()))
    torch.testing.assert_close(table, codes.view(torch.float8_e4m3fn).float(), atol=0, rtol=0, equal_nan=True)
    x = torch.tensor([1 + 1 / 16, 1 + 3 / 16, 2.0 ** -10, 3 * 2.0 ** -10, 1.9375, -0.0, 0.0, -3.3, 240.5])
    got = float_to_e4m3_bits(x.numpy())
    assert got.dtype == np.uint8
    assert torch.equal(torch.from_numpy(got), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.from_numpy(got).view(torch.float8_e4m3fn).float().tolist()[:5] == [1.0, 1.25, 0.0, 2.0 ** -8, 2.0]
