"""The CUDA decode-attention extension (csrc/, pixtral_fast._C), checked as far as each machine allows.

1. nvcc compiles every .cu for sm_90a and sm_80 with no spills (ptxas -v), here, without a GPU.
2. pixtral_fast._C imports under the CPU torch, registers its op next to the Python custom ops of
   pixtral_fast.ops, and rejects CPU tensors with a clear error.
3. The kernels' own source runs on the CPU through a host emulation of CUDA threads, warps,
   shuffles and barriers (tests/support/cuda_host_emu.h) and matches the fp64 oracle.
4. On a GPU (gpu-marked): the real op against the oracle, and CUDA-graph capture and replay.
(1)-(2) skip only when nvcc is absent; (3) when no host compiler or CUDA headers are found.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixtral_fast import _cuda_decode
from tests.support.paged_cases import check_graph_replay, make_case, oracle
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_HOME = _cuda_decode.cuda_home()
needs_nvcc = pytest.mark.skipif(CUDA_HOME is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
ARCHS = {"sm_90a": "arch=compute_90a,code=sm_90a", "sm_80": "arch=compute_80,code=sm_80"}
# The kernels must also compile under the flags torch's JIT build passes (no implicit half maths).
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
KERNELS_PER_CU = {"decode_attention.cu": 2 * 2 * 4 + 2 * 2}  # split: dtype x D x heads; merge: dtype x D


# ---------------------------------------------------------------------------------------------
# 1. nvcc + ptxas


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per kernel: registers, stack, spill stores/loads, from `-Xptxas -v` output."""
    kernels, current = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            current = kernels.setdefault(m.group(1), {"arch": m.group(2)})
        elif current is not None and (m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            current["smem"] = int(s.group(1)) if (s := re.search(r"(\d+) bytes smem", line)) else 0
    return kernels


def demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return [n.replace("pf_decode::", "").replace("(DecodeParams)", "").removeprefix("void ")
            for n in out.splitlines()]


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cu_compiles_without_spills(source, arch, tmp_path):
    cmd = [str(CUDA_HOME / "bin" / "nvcc"), "-c", str(CSRC / source), "-o", str(tmp_path / "k.o"),
           f"-I{CSRC}", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
           "-gencode", ARCHS[arch], *TORCH_NVCC_DEFINES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    kernels = parse_ptxas(proc.stdout + proc.stderr)
    names = sorted(kernels)
    print(f"\n{source} {arch}: registers / spill stores / spill loads / stack / static smem")
    for name, pretty in zip(names, demangle(names)):
        k = kernels[name]
        print(f"  {pretty:46s} {k.get('registers', -1):4d} {k.get('spill_stores', -1):4d} "
              f"{k.get('spill_loads', -1):4d} {k.get('stack', -1):4d} {k.get('smem', 0):6d}")
    assert len(kernels) == KERNELS_PER_CU.get(source, len(kernels)) and kernels, proc.stderr[-3000:]
    for name, k in kernels.items():
        assert k["arch"] == arch and k.get("registers", 0) > 0, f"{name}: no ptxas report"
        assert (k["spill_stores"], k["spill_loads"], k["stack"]) == (0, 0, 0), f"{name} spills: {k}"
        assert k["smem"] <= 48 * 1024, f"{name}: {k['smem']} B static shared memory"


# ---------------------------------------------------------------------------------------------
# 2. the extension under this process's torch


@pytest.fixture(scope="module")
def ext():
    """The registered op: the prebuilt pixtral_fast._C (required where nvcc exists and torch is a
    CPU build: setup.py builds it), or on a CUDA torch without one, the JIT build."""
    if CUDA_HOME is None:
        pytest.skip("nvcc not found: the extension is not built on this machine")
    try:
        from pixtral_fast import _C  # noqa: F401
    except ImportError as exc:
        if torch.version.cuda is None:
            pytest.fail(f"nvcc exists but pixtral_fast._C does not import ({exc}): "
                        "build it with `pip install --no-build-isolation -e .`")
    assert _cuda_decode.available(), _cuda_decode.status()


def test_op_registered(ext):
    op = torch.ops.pixtral_fast.gqa_decode_attention_cuda.default
    assert "Tensor(a!) out" in str(op._schema) and "int stream" in str(op._schema)


def test_op_rejects_cpu_tensors(ext):
    q = torch.randn(1, 4, 64, dtype=torch.float16)
    cache = torch.randn(2, 16, 1, 64, dtype=torch.float16)
    table, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="gqa_decode_attention_cuda: q must be a CUDA tensor"):
        torch.ops.pixtral_fast.gqa_decode_attention_cuda(q, cache, cache, table, lens, 0.125, 1,
                                                         torch.empty_like(q), torch.empty(0), 0)


@pytest.mark.parametrize("order", ["extension first", "ops first"])
def test_registration_coexists_with_python_ops(ext, order, tmp_path):
    """TORCH_LIBRARY(pixtral_fast) in C++ and torch.library.custom_op("pixtral_fast::...") in
    pixtral_fast.ops share one namespace, loaded in either order (a fresh process each). Importing
    anything of the package runs pixtral_fast/__init__.py, which imports ops: so the library is
    loaded by path to come first."""
    prebuilt = sorted((ROOT / "pixtral_fast").glob("_C*.so"))
    if prebuilt:
        load = f"torch.ops.load_library({str(prebuilt[0])!r})"
    elif order == "extension first":
        pytest.skip("no prebuilt pixtral_fast._C to load before the package (JIT builds load after it)")
    else:
        load = "from pixtral_fast import _cuda_decode; assert _cuda_decode.available(), _cuda_decode.status()"
    steps = [load, "import pixtral_fast.ops"]
    if order == "ops first":
        steps.reverse()
    code = "\n".join(["import torch", *steps, "print(torch.ops.pixtral_fast.gqa_decode_attention_cuda, "
                       "torch.ops.pixtral_fast.gqa_decode_attention)"])
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_choose_num_splits():
    choose = _cuda_decode.choose_num_splits
    # NeMo (8 KV heads, group 4) on an H200 (132 SMs x 3 resident CTAs): batch 1 at long context
    # fills one wave, 49 x 8 = 392 CTAs of 396 slots;
    assert choose(1, 8, 4, 32768, 132) == 49
    # never a split shorter than MIN_KEYS_PER_SPLIT keys of the table's capacity;
    assert choose(1, 8, 4, 1024, 132) == 1024 // _cuda_decode.MIN_KEYS_PER_SPLIT
    # a batch that fills the GPU by itself is not split; the cap holds.
    assert choose(128, 8, 4, 32768, 132) == 1
    assert choose(1, 1, 1, 1 << 20, 132) == _cuda_decode.MAX_SPLITS
    # Groups above 8 heads take several CTAs per KV head, of the 2-per-SM 8-head kernel.
    assert choose(4, 1, 16, 32768, 132) == 132 * 2 // 8


# ---------------------------------------------------------------------------------------------
# shared case builder


# (head_dim, kv_heads, group, block_size, seq_lens, num_splits): every kernel instantiation
# (heads per CTA 1, 2, 4, 8 x D 64, 128), one split (direct store) and several (merge), a group
# of 5 (3 idle rows), 12 (two head chunks), more splits than tiles (neutral partials).
EMU_CASES = {
    "d128_g4_bs16_s3": (128, 2, 4, 16, [1, 15, 16, 17, 150], 3),
    "d64_g4_bs16_direct": (64, 2, 4, 16, [1, 15, 16, 17, 150], 1),
    "d128_g1_bs32_s2": (128, 3, 1, 32, [31, 33, 1, 96], 2),
    "d64_g1_bs16_direct": (64, 1, 1, 16, [200, 3], 1),
    "d64_g2_bs64_s4": (64, 2, 2, 64, [64, 1, 63, 65], 4),
    "d128_g2_bs16_direct": (128, 1, 2, 16, [47, 2], 1),
    "d128_g5_bs16_s2": (128, 1, 5, 16, [17, 1, 40], 2),
    "d64_g8_bs256_s3": (64, 1, 8, 256, [1, 255, 256, 257], 3),
    "d128_g12_bs16_s2": (128, 1, 12, 16, [1, 20, 70], 2),
    "d64_g4_bs16_s64": (64, 1, 4, 16, [1, 17, 100], 64),
    "d128_g4_bs64_long": (128, 1, 4, 64, [3000, 5], 4),
}


# ---------------------------------------------------------------------------------------------
# 3. the kernels' source on the CPU, through the host emulation of CUDA


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from tests.support import cuda_emu

    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) for the host emulation")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no host C++ compiler for the emulation harness")
    return cuda_emu.build(tmp_path_factory.mktemp("emu"), CUDA_HOME)


def run_emulated(lib, *args):
    from tests.support import cuda_emu

    return cuda_emu.gqa_decode_attention(lib, *args)


@pytest.mark.parametrize("case", EMU_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulated_kernel_matches_reference(emu, case, dtype):
    head_dim, kv_heads, group, block_size, seq_lens, num_splits = EMU_CASES[case]
    garbage = -1 if dtype == torch.float16 else 2**30  # both kinds of junk past each sequence
    q, k_cache, v_cache, table, lens = make_case(head_dim, kv_heads, group, block_size, seq_lens, dtype,
                                                 garbage=garbage)
    scale = head_dim ** -0.5
    out = run_emulated(emu, q, k_cache, v_cache, table, lens, scale, num_splits)
    assert_close(out, oracle(q, k_cache, v_cache, table, lens, scale), dtype)


@pytest.mark.parametrize("num_splits", [1, 5])
def test_emulated_empty_sequence_gives_zeros(emu, num_splits):
    """seq_len 0 (a padded graph slot; ops rejects it eagerly) gives zeros, never NaN."""
    q, k_cache, v_cache, table, lens = make_case(64, 1, 4, 16, [20, 1], torch.bfloat16)
    lens[1] = 0
    out = run_emulated(emu, q, k_cache, v_cache, table, lens, 0.125, num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out[0], oracle(q[:1], k_cache, v_cache, table[:1], lens[:1], 0.125)[0], torch.bfloat16)


def test_emulated_strided_inputs(emu):
    """The kernels take strides, not shapes: q a view with padded rows, caches views holding one
    KV head of two, and a table with padded rows."""
    q, k_cache, v_cache, table, lens = make_case(128, 2, 4, 32, [1, 31, 33, 200], torch.float16, seed=5)
    q_view = torch.zeros(4, 8, 136, dtype=torch.float16)[:, :, :128]
    q_view.copy_(q)
    k_view, v_view = k_cache[:, :, 1:], v_cache[:, :, 1:]  # KV head 1 only: stride_token = 2 * 128
    table_view = torch.full((4, table.shape[1] + 3), -1, dtype=torch.int32)[:, :table.shape[1]]
    table_view.copy_(table)
    assert not (q_view.is_contiguous() or k_view.is_contiguous() or table_view.is_contiguous())
    out = run_emulated(emu, q_view, k_view, v_view, table_view, lens, 0.09, 3)
    assert_close(out, oracle(q, k_view, v_view, table, lens, 0.09), torch.float16)


def test_emulated_heads_per_cta_matches_python(emu):
    """The Python split heuristic counts CTAs and resident CTAs as the kernel does."""
    for group in range(1, 33):
        heads = _cuda_decode.heads_per_cta(group)
        assert emu.pf_emu_heads_per_cta(group) == heads, group
        assert emu.pf_emu_min_blocks(heads) == _cuda_decode.resident_ctas_per_sm(heads), heads


# ---------------------------------------------------------------------------------------------
# 4. GPU only: the real op


GPU_CASES = {
    "d128_nemo_bs16": (128, 8, 4, 16, [1, 15, 16, 17, 4100]),
    "d64_g4_bs16": (64, 2, 4, 16, [1, 15, 16, 17, 2500]),
    "d128_g8_bs64": (128, 1, 8, 64, [64, 1, 63, 65, 3000]),
    "d64_g1_bs64": (64, 3, 1, 64, [65, 1, 130, 5000]),
    "d128_g1_bs256": (128, 2, 1, 256, [1, 255, 256, 257, 3333]),
    "d128_g5_bs32": (128, 2, 5, 32, [31, 33, 1, 96, 2048]),
    "d128_g12_bs128": (128, 1, 12, 128, [127, 129, 1, 4000]),
}


@pytest.mark.gpu
def test_gpu_extension_available():
    """Loaded, and its first-use self-check against the Triton twin passed on this device."""
    from pixtral_fast import ops

    assert _cuda_decode.available("cuda"), _cuda_decode.status()
    assert "passed" in _cuda_decode.status() and ops.decode_backend("cuda", torch.bfloat16) == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 7, 64])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_matches_reference(case, dtype, num_splits):
    head_dim, kv_heads, group, block_size, seq_lens = GPU_CASES[case]
    q, k_cache, v_cache, table, lens = make_case(head_dim, kv_heads, group, block_size, seq_lens, dtype,
                                                 device="cuda", garbage=2**30 if num_splits else -1)
    scale = head_dim ** -0.5
    out = _cuda_decode.gqa_decode_attention(q, k_cache, v_cache, table, lens, scale, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, oracle(q, k_cache, v_cache, table, lens, scale), dtype)


@pytest.mark.gpu
def test_gpu_rejects_bad_arguments():
    q, k_cache, v_cache, table, lens = make_case(64, 1, 4, 16, [5], torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="k_cache must be a CUDA tensor"):
        _cuda_decode.gqa_decode_attention(q, k_cache.cpu(), v_cache, table, lens, 0.125)
    with pytest.raises(RuntimeError, match="num_splits must be in"):
        _cuda_decode.gqa_decode_attention(q, k_cache, v_cache, table, lens, 0.125, num_splits=65)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        _cuda_decode.gqa_decode_attention(q.float(), k_cache.float(), v_cache.float(), table, lens, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_cuda_graph_replay_with_new_tables(dtype):
    check_graph_replay(lambda *a: _cuda_decode.gqa_decode_attention(*a, 128 ** -0.5), dtype,
                       [[1, 17, 300, 2000], [2000, 5, 16, 999], [4, 4, 4, 4]])


# ---------------------------------------------------------------------------------------------
# 5. The self-check on first use (CPU: the launch is faked, the Triton twin runs interpreted)


@pytest.fixture
def fake_extension(monkeypatch):
    """The op counts as loaded on CUDA devices 0 and 1 (indices faked), the check's tensors live
    on this machine's device, and `launches` records each faked launch's device."""
    from tests.conftest import DEVICE

    _cuda_decode._forget_verdicts()
    monkeypatch.setattr(_cuda_decode, "loaded", lambda: True)
    monkeypatch.setattr(_cuda_decode, "_CHECKED_DEVICE_TYPE", DEVICE)

    def fake_index(device):
        device = torch.device(device if device is not None else "cuda:0")
        return None if device.type != "cuda" else (device.index or 0)

    monkeypatch.setattr(_cuda_decode, "_cuda_index", fake_index)
    launches = []

    def install(result):
        def launch(q, k_cache, v_cache, table, lens, scale, num_splits=None):
            launches.append((q.device, q.dtype, num_splits))
            return result(q, k_cache, v_cache, table, lens, scale)

        monkeypatch.setattr(_cuda_decode, "_launch", launch)
        return launches

    yield install
    _cuda_decode._forget_verdicts()


def exact(q, k_cache, v_cache, table, lens, scale):
    """A correct launch: the fp64 oracle rounded to q's dtype."""
    return oracle(q, k_cache, v_cache, table, lens, scale).to(q.dtype)


def check_fails_once(message: str):
    from pixtral_fast import ops

    with pytest.warns(RuntimeWarning, match="failed its self-check") as seen:
        assert not _cuda_decode.available("cuda:0")
        assert not _cuda_decode.available("cuda:0")  # the verdict is final: no second check
        assert ops.decode_backend("cuda:0", torch.bfloat16) == "triton"
    assert len([w for w in seen if "self-check" in str(w.message)]) == 1
    status = _cuda_decode.status()
    assert message in status and "cuda:0 uses the Triton kernel" in status, status


def test_self_check_passes_a_correct_launch(fake_extension, recwarn):
    launches = fake_extension(exact)
    assert _cuda_decode.available("cuda:0") and _cuda_decode.available()
    # both dtypes, two context splits (split and merge kernels), once per device
    assert [(dtype, splits) for _, dtype, splits in launches] == [(torch.float16, 2), (torch.bfloat16, 2)]
    assert "self-check on" in _cuda_decode.status() and "passed" in _cuda_decode.status()
    assert not [w for w in recwarn if "self-check" in str(w.message)]


def test_self_check_launch_error_falls_back_to_triton(fake_extension):
    def driver_too_old(*args):
        raise RuntimeError("gqa_decode_attention_cuda: launch failed: CUDA driver version is insufficient "
                           "for CUDA runtime version")

    launches = fake_extension(driver_too_old)
    check_fails_once("CUDA driver version is insufficient")
    assert len(launches) == 1  # stopped at the first failing launch


@pytest.mark.parametrize("fault", ["zeros", "one_element_off", "nan", "swapped_sequences"])
def test_self_check_wrong_values_fall_back_to_triton(fake_extension, fault):
    def wrong(q, k_cache, v_cache, table, lens, scale):
        out = exact(q, k_cache, v_cache, table, lens, scale)
        if fault == "zeros":
            return torch.zeros_like(out)
        if fault == "nan":
            out[1, 3, 7] = float("nan")
        elif fault == "one_element_off":  # just past the bound, in one element only
            atol, rtol = _cuda_decode.SELF_CHECK_TOLERANCE[q.dtype]
            out[0, 5, 100] += 2 * (atol + rtol * out[0, 5, 100].abs()) + 0.01
        else:
            out = out.flip(0)
        return out

    fake_extension(wrong)
    check_fails_once("non-finite" if fault == "nan" else "wrong result")


def test_self_check_accepts_differences_within_tolerance(fake_extension):
    """Two correct kernels differ by rounding: half the bound everywhere must still pass."""
    def rounded_differently(q, k_cache, v_cache, table, lens, scale):
        out = exact(q, k_cache, v_cache, table, lens, scale).float()
        atol, _ = _cuda_decode.SELF_CHECK_TOLERANCE[q.dtype]
        return (out + 0.4 * atol).to(q.dtype)

    fake_extension(rounded_differently)
    assert _cuda_decode.available("cuda:0"), _cuda_decode.status()


def test_self_check_is_per_device(fake_extension):
    launches = fake_extension(exact)
    assert _cuda_decode.available("cuda:0")
    n0 = len(launches)

    def raise_launch(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    fake_extension(raise_launch)
    with pytest.warns(RuntimeWarning, match="cuda:1 uses the Triton kernel"):
        assert not _cuda_decode.available("cuda:1")
    assert _cuda_decode.available("cuda:0") and len(launches) == n0 + 1  # device 0 kept its verdict
    status = _cuda_decode.status()
    assert "passed" in status and "no kernel image" in status and "cuda:1 uses the Triton kernel" in status


def test_no_cuda_device_needs_no_check(fake_extension):
    launches = fake_extension(exact)
    assert _cuda_decode.available("cpu") and not launches


def test_self_check_without_a_working_twin_uses_the_reference(fake_extension, monkeypatch):
    from pixtral_fast.kernels import decode_attention as triton_decode

    def broken(*args, **kwargs):
        raise RuntimeError("triton: no driver")

    monkeypatch.setattr(triton_decode, "gqa_decode_attention", broken)
    fake_extension(exact)
    assert _cuda_decode.available("cuda:0") and "passed vs the reference" in _cuda_decode.status()
    _cuda_decode._forget_verdicts()
    fake_extension(lambda *a: exact(*a) + 1)
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        assert not _cuda_decode.available("cuda:0")
