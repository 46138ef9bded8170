"""The package alone computes right under Triton's interpreter in every dtype its kernels take.

`pixtral_fast.kernels` installs its interpreter fix (kernels/_interpreter.py) itself when
TRITON_INTERPRET=1: a plain `python -c` that never imports tests/ runs every kernel in fp32, fp16
and bf16 and reports its error against an fp64 oracle computed in the same script; the bounds are
tests/tolerances.py's. The fix itself is checked op by op on a small kernel, against torch doing the
same bf16 arithmetic (fp32 math, one rounding to bf16).
"""
import textwrap

import pytest
import torch

from tests.conftest import HAS_CUDA
from tests.support.interpreted import run_interpreted
from tests.tolerances import TOL

# Runs in a fresh interpreter: only pixtral_fast, torch and triton. The oracle is plain fp64 math
# written here; RoPE angles from theta directly.
SCRIPT = textwrap.dedent("""
    import json, math, sys
    import torch
    from pixtral_fast import ops
    from pixtral_fast.kernels import _interpreter
    assert not any(m == "tests" or m.startswith("tests.") for m in sys.modules), "tests/ was imported"

    def attention64(q, k, v, causal):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
        if causal:
            s = s.masked_fill(torch.ones(s.shape[1:], dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)

    def rope64(x, angle):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, s = angle.cos()[:, None], angle.sin()[:, None]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)

    errors = {"shim_installed": _interpreter.installed()}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).split(".")[1]
        rnd = lambda *shape, s=1.0: (s * torch.randn(*shape, generator=g)).to(dtype)
        err = lambda out, ref: (out.double() - ref).abs().max().item() / (1 + ref.abs().max().item())
        q, k, v = rnd(50, 4, 64, s=1.5), rnd(50, 2, 64, s=1.5), rnd(50, 2, 64)
        cu = torch.tensor([0, 50], dtype=torch.int32)
        out = ops.varlen_attention(q, k, v, cu, 50, causal=True)
        errors[f"varlen_{name}"] = err(out, attention64(q.double(), k.double(), v.double(), True))

        kc, vc, qd = rnd(5, 16, 2, 64), rnd(5, 16, 2, 64), rnd(2, 4, 64, s=2.0)
        table = torch.tensor([[3, 0, 4], [1, 2, 0]], dtype=torch.int32)
        lens = torch.tensor([40, 20], dtype=torch.int32)
        out = ops.gqa_decode_attention(qd, kc, vc, table, lens)
        for b, n in enumerate(lens.tolist()):
            kb = kc[table[b].long()].flatten(0, 1)[:n].double()
            vb = vc[table[b].long()].flatten(0, 1)[:n].double()
            ref = attention64(qd[b:b + 1].double(), kb, vb, False)[0]
            errors[f"decode_{name}_{b}"] = err(out[b], ref)

        x, wg, wu, wd = rnd(7, 64), rnd(96, 64, s=0.125), rnd(96, 64, s=0.125), rnd(64, 96, s=0.1)
        out = ops.gated_ffn(x, wg, wu, wd, "silu")
        h = torch.nn.functional.silu(x.double() @ wg.double().T) * (x.double() @ wu.double().T)
        errors[f"ffn_{name}"] = err(out, h.to(dtype).double() @ wd.double().T)

        pos = torch.randint(0, 131072, (9,), dtype=torch.int32, generator=g)
        f = torch.tensor([1e9 ** (-2 * i / 128) for i in range(64)]).float().double()
        angle = (pos.double()[:, None] * f).float().double()
        qr = rnd(9, 2, 128)
        out, _ = ops.rope_1d(qr, qr, pos, 1e9)
        errors[f"rope_{name}"] = err(out, rope64(qr.double(), angle))
    print(json.dumps(errors))
""")


def test_package_alone_is_right_in_every_dtype(tmp_path):
    errors = run_interpreted(SCRIPT, tmp_path)
    assert errors.pop("shim_installed") is True
    assert len(errors) == 3 * 5
    bound = {"float32": TOL[torch.float32][0], "float16": TOL[torch.float16][0],
             "bfloat16": TOL[torch.bfloat16][0]}
    bad = {key: e for key, e in errors.items() if not e <= bound[key.split("_")[1]]}
    assert not bad, f"errors relative to max |ref| beyond tolerance: {bad}"


# ---------------------------------------------------------------------------------------------
# the fix, op by op (in this process: the suite runs interpreted on a CPU-only machine)


pytestmark_interp = pytest.mark.skipif(HAS_CUDA, reason="checks the CPU interpreter; a GPU runs kernels compiled")


def _bf16_ops_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, out_ptr, red_ptr, dot_ptr, f64_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        a = tl.load(a_ptr + offs)  # bf16
        b = tl.load(b_ptr + offs)
        tl.store(out_ptr + 0 * N + offs, a + b)
        tl.store(out_ptr + 1 * N + offs, a * b)
        tl.store(out_ptr + 2 * N + offs, -a)
        tl.store(out_ptr + 3 * N + offs, tl.maximum(a, b))
        tl.store(out_ptr + 4 * N + offs, a / b)
        tl.store(out_ptr + 5 * N + offs, tl.where(a < b, a, b))
        tl.store(out_ptr + 6 * N + offs, (a.to(tl.float32) * 3.0).to(tl.bfloat16))  # RTNE cast
        tl.store(out_ptr + 7 * N + offs, (a.to(tl.float64) * 3.0).to(tl.bfloat16))  # via fp64
        tl.store(out_ptr + 8 * N + offs, tl.fma(a, b, a))
        tl.store(red_ptr + 0, tl.max(a, axis=0))
        tl.store(red_ptr + 1, tl.min(a, axis=0))
        tl.store(red_ptr + 2, tl.sum(a, axis=0))
        tl.store(f64_ptr + offs, a.to(tl.float64))
        m = tl.reshape(a, (4, 4))
        tl.store(dot_ptr + tl.arange(0, 16), tl.reshape(tl.dot(m, tl.reshape(b, (4, 4)).to(tl.bfloat16),
                                                               out_dtype=tl.float32), (16,)))

    return kernel


@pytestmark_interp
def test_bf16_interpreter_ops_match_gpu_semantics():
    """Each bf16 op of the interpreter, as a GPU computes it: fp32 math rounded to nearest-even
    bf16 (elementwise, reductions, casts), fp32 accumulation for dots."""
    from pixtral_fast.kernels import _interpreter

    assert _interpreter.installed()
    n = 16
    g = torch.Generator().manual_seed(0)
    a = (3 * torch.randn(n, generator=g)).bfloat16()
    b = (3 * torch.randn(n, generator=g)).bfloat16()
    out = torch.empty(9, n, dtype=torch.bfloat16)
    red = torch.empty(3, dtype=torch.bfloat16)
    dot = torch.empty(16, dtype=torch.float32)
    f64 = torch.empty(n, dtype=torch.float64)
    # tl.dot needs 16x16 tiles on a GPU, not in the interpreter: 4x4 keeps this a unit check.
    _bf16_ops_kernel()[(1,)](a, b, out, red, dot, f64, N=n)
    af, bf = a.float(), b.float()
    expected = [af + bf, af * bf, -af, torch.maximum(af, bf), af / bf, torch.where(af < bf, af, bf),
                af * 3.0, af.double() * 3.0, af * bf + af]
    for i, e in enumerate(expected):
        assert torch.equal(out[i], e.bfloat16()), f"op {i}: {out[i]} != {e.bfloat16()}"
    assert torch.equal(red[:2], torch.stack([af.max(), af.min()]).bfloat16())
    torch.testing.assert_close(red[2].float(), af.sum(), atol=0.0625, rtol=2 ** -8)
    assert torch.equal(f64, a.double())
    torch.testing.assert_close(dot, (af.view(4, 4) @ bf.view(4, 4)).flatten(), atol=1e-5, rtol=1e-6)


@pytestmark_interp
def test_fp32_to_bf16_rounds_to_nearest_even_with_carry():
    """The cast a kernel's store of an fp32 result in a bf16 tensor goes through: ties to even,
    and a mantissa carry into the exponent (0.4998 -> 0.5, which the interpreter's own RTNE path
    turns into 0.25)."""
    import numpy as np

    from pixtral_fast.kernels._interpreter import bf16_bits_to_fp32, fp32_to_bf16_bits

    x = torch.tensor([0.4998, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.7, 3.4e38, float("inf"), 1e-40])
    bits = fp32_to_bf16_bits(x.numpy())
    assert torch.equal(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16), x.bfloat16())
    assert torch.equal(torch.from_numpy(bf16_bits_to_fp32(bits)), x.bfloat16().float())
    assert np.isnan(bf16_bits_to_fp32(fp32_to_bf16_bits(np.array([np.nan], np.float32))))[0]
