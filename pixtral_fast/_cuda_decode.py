"""The CUDA decode-attention extension (csrc/): loading it, proving it on each device, launching it.

Loading: `pixtral_fast._C`, built by setup.py where torch was importable at build time (a
`--no-build-isolation` install, or `make`), registers the op
`torch.ops.pixtral_fast.gqa_decode_attention_cuda`. Without it (an install with build isolation,
which cannot see torch), the first CUDA use builds csrc/ just in time with
torch.utils.cpp_extension into a cache directory (`cache_dir()`) and loads that; it needs a CUDA
torch, a GPU and nvcc, and later processes reuse the cached build.

Proving: the first use on each device launches the op once on a small case and compares it with
its Triton twin (kernels/decode_attention.py). A launch error (e.g. a driver older than the
statically linked CUDA runtime) or a mismatch switches that device's decode attention to the
Triton kernel, with one RuntimeWarning; `status()` says which runs and why.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from pixtral_fast import kernels
from pixtral_fast._cuda_home import cuda_home


def _find_csrc() -> Path:
    """The CUDA sources: shipped inside the package (pixtral_fast/csrc in a wheel), or the
    source tree's csrc/ (an editable install or a checkout)."""
    packaged = Path(__file__).resolve().parent / "csrc"
    return packaged if (packaged / "bindings.cpp").is_file() else Path(__file__).resolve().parent.parent / "csrc"


CSRC = _find_csrc()
MAX_SPLITS = 64  # PF_DECODE_MAX_SPLITS in csrc/decode_attention_api.h
MAX_HEADS_PER_CTA = 8  # kMaxHeadsPerCta in csrc/decode_plan.h
MIN_KEYS_PER_SPLIT = 128  # below this a split's fixed cost (q load, merge) outweighs its keys
# The self-check compares two kernels that are each within tests/tolerances.py's bound of the
# fp64 oracle, so they may differ by twice that bound.
SELF_CHECK_TOLERANCE = {torch.float16: (4e-3, 4e-3), torch.bfloat16: (3.2e-2, 3.2e-2)}

_load_status = "not loaded yet"
_verdicts: dict[int, tuple[bool, str]] = {}  # CUDA device index -> (passed, what the check saw)
_check_lock = threading.RLock()
_CHECKED_DEVICE_TYPE = "cuda"  # CPU unit tests set "cpu" to run the check's logic under the interpreter


def _op_registered() -> bool:
    return hasattr(torch.ops.pixtral_fast, "gqa_decode_attention_cuda")


def cache_dir() -> Path:
    """Where just-in-time builds go: $PIXTRAL_FAST_CACHE, else $XDG_CACHE_HOME/pixtral_fast, else
    ~/.cache/pixtral_fast; one folder per torch version, CUDA version and GPU arch."""
    root = os.environ.get("PIXTRAL_FAST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pixtral_fast"
    return Path(root)


def _jit_build(cuda: Path) -> None:
    """Builds csrc/ for this GPU's arch into cache_dir() and loads it (which registers the op)."""
    import torch.utils.cpp_extension as cpp_extension

    os.environ["CUDA_HOME"] = str(cuda)
    cpp_extension.CUDA_HOME = str(cuda)  # read at import time; the env var may have come too late
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")  # sm_90a on Hopper, as setup.py builds
    build_dir = cache_dir() / f"cuda_decode-torch{torch.__version__}-cuda{torch.version.cuda}-sm_{arch}"
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"pixtral_fast: building the CUDA decode extension for sm_{arch} into {build_dir} "
          "(once, about a minute)", file=sys.stderr, flush=True)
    # An explicit -gencode makes torch add no arch flags of its own (nor read TORCH_CUDA_ARCH_LIST).
    cpp_extension.load(
        name="pixtral_fast_cuda_decode",
        sources=[str(CSRC / "bindings.cpp"), str(CSRC / "decode_attention.cu")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


@functools.lru_cache(maxsize=None)
def loaded() -> bool:
    """Whether the CUDA op is registered in this process (importing or building it once)."""
    global _load_status
    try:
        from pixtral_fast import _C  # noqa: F401  (registers the op)

        _load_status = "prebuilt pixtral_fast._C"
        return True
    except ImportError as exc:
        prebuilt_error = f"pixtral_fast._C not importable ({exc})"
    if _op_registered():  # loaded by other means, e.g. an earlier JIT build in this process
        _load_status = "registered"
        return True
    cuda = cuda_home()
    if not torch.cuda.is_available() or torch.version.cuda is None or cuda is None:
        _load_status = f"{prebuilt_error}; no JIT build: needs a CUDA torch, a GPU and nvcc"
        return False
    try:
        _jit_build(cuda)
    except Exception as exc:  # reported, not swallowed: decode falls back to Triton loudly
        _load_status = f"{prebuilt_error}; JIT build of {CSRC} with {cuda} failed: {type(exc).__name__}: {exc}"
        warnings.warn(f"pixtral_fast CUDA decode extension unavailable: {_load_status}", RuntimeWarning, stacklevel=2)
        return False
    _load_status = f"JIT-built from {CSRC} into {cache_dir()} with {cuda}"
    return _op_registered()


def _self_check_case(dtype: torch.dtype, device: torch.device):
    """A small paged case: 2 sequences (37 and 5 tokens, so a partial last block), GQA group 4,
    head_dim 128, 16-token blocks in shuffled order. Made on the CPU from a fixed seed."""
    gen = torch.Generator().manual_seed(1234)
    block_size, kv_heads, group, head_dim = 16, 2, 4, 128
    k_cache, v_cache = (torch.randn(6, block_size, kv_heads, head_dim, generator=gen) for _ in range(2))
    q = 2.0 * torch.randn(2, kv_heads * group, head_dim, generator=gen)
    table = torch.tensor([[4, 1, 5], [2, 0, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([37, 5], dtype=torch.int32)
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
            for t in (q, k_cache, v_cache, table, seq_lens)]


def self_check(device: torch.device) -> tuple[bool, str]:
    """One launch of the op per dtype on `device` against the Triton twin on the same inputs,
    with two context splits (so both the split and the merge kernel run). Returns (passed, why)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _self_check_on(device)
    return _self_check_on(device)


def _self_check_on(device: torch.device) -> tuple[bool, str]:
    from pixtral_fast import reference
    from pixtral_fast.kernels import decode_attention as triton_decode

    seen = []
    for dtype, (atol, rtol) in SELF_CHECK_TOLERANCE.items():
        q, k_cache, v_cache, table, seq_lens = _self_check_case(dtype, device)
        scale = q.shape[-1] ** -0.5
        try:
            got = _launch(q, k_cache, v_cache, table, seq_lens, scale, num_splits=2)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous launch error surfaces here
        except Exception as exc:  # e.g. "CUDA driver version is insufficient for CUDA runtime version"
            return False, f"launch failed on {device} ({dtype}): {type(exc).__name__}: {exc}"
        try:
            want = triton_decode.gqa_decode_attention(q, k_cache, v_cache, table, seq_lens, scale).float()
            twin = "the Triton kernel"
        except Exception as exc:  # no twin to compare with here: the plain-PyTorch reference instead
            want = reference.gqa_decode_attention(q.float(), k_cache.float(), v_cache.float(), table, seq_lens, scale)
            twin = f"the reference (the Triton kernel failed: {type(exc).__name__})"
        got = got.float()
        if got.shape != want.shape or not bool(torch.isfinite(got).all()):
            return False, f"wrong result on {device} ({dtype}): shape {tuple(got.shape)} or non-finite values"
        err = (got - want).abs()
        excess = float((err - atol - rtol * want.abs()).max())
        if excess > 0:
            return False, (f"wrong result on {device} ({dtype}): max |cuda - triton| {float(err.max()):.3g} "
                           f"exceeds atol {atol} + rtol {rtol}")
        seen.append(f"{str(dtype).removeprefix('torch.')} max diff {float(err.max()):.2g}")
    return True, f"self-check on {device} passed vs {twin} ({', '.join(seen)})"


def _cuda_index(device) -> int | None:
    """The CUDA device index to self-check on; None where no CUDA device can run (a CPU torch)."""
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def available(device: torch.device | str | None = None) -> bool:
    """Whether decode attention may launch the CUDA op on `device` (default: the current CUDA
    device, if any): the op is registered and, on a CUDA device, its self-check on that device
    passed. The check runs once per device, on first use; a failure warns once and is final."""
    if getattr(loaded, "cache_info", None) and loaded.cache_info().currsize == 0:
        with _check_lock:  # one import or JIT build, whichever thread comes first
            loaded()
    if not loaded():
        return False
    index = _cuda_index(device)
    if index is None:  # no CUDA device to prove it on (a CPU torch): registered is all there is
        return True
    verdict = _verdicts.get(index)
    if verdict is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False  # no check inside a graph capture (it synchronizes); checked on next eager use
        with _check_lock:
            verdict = _verdicts.get(index)
            if verdict is None:
                verdict = self_check(torch.device(_CHECKED_DEVICE_TYPE, index))
                _verdicts[index] = verdict
                if not verdict[0]:
                    warnings.warn(f"pixtral_fast: the CUDA decode extension failed its self-check "
                                  f"({verdict[1]}); decode attention on cuda:{index} uses the Triton kernel",
                                  RuntimeWarning, stacklevel=2)
    return verdict[0]


def status() -> str:
    """How the extension was loaded, or why it was not, and each device's self-check verdict."""
    parts = [_load_status]
    for index, (passed, why) in sorted(_verdicts.items()):
        parts.append(why if passed else f"{why}: cuda:{index} uses the Triton kernel")
    return "; ".join(parts)


def _forget_verdicts() -> None:
    """Forgets every device's self-check verdict (tests that fake a launch call this around them)."""
    _verdicts.clear()


def heads_per_cta(group: int) -> int:
    """Query heads per CTA (the kernel's template choice): the group rounded up to a power of
    two, at most MAX_HEADS_PER_CTA; larger groups take several head chunks."""
    h = 1
    while h < group and h < MAX_HEADS_PER_CTA:
        h *= 2
    return h


def resident_ctas_per_sm(heads: int) -> int:
    """CTAs of the split kernel an SM holds at once: its __launch_bounds__ minimum (kMinBlocks in
    csrc/decode_plan.h), which its register use is held to."""
    return 2 if heads >= 8 else 3


def choose_num_splits(batch: int, kv_heads: int, group: int, max_context: int, sm_count: int) -> int:
    """Context splits per (sequence, KV head, head chunk): as many as fill one wave of resident
    CTAs (a second, partial wave would idle most SMs at its end), but no split shorter than
    MIN_KEYS_PER_SPLIT keys of the context bound (the table's capacity, not seq_lens)."""
    heads = heads_per_cta(group)
    ctas = max(1, batch * kv_heads * -(-group // heads))
    want = sm_count * resident_ctas_per_sm(heads) // ctas
    by_length = max_context // MIN_KEYS_PER_SPLIT
    return max(1, min(want, by_length, MAX_SPLITS))


def gqa_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale, num_splits=None):
    """The CUDA op on fp16/bf16 CUDA tensors validated by pixtral_fast.ops: q [B, Hq, D]; caches
    [num_blocks, block_size, Hkv, D]; block_table int32 [B, max_blocks]; seq_lens int32 [B] (on the
    device, never read here). Launches on the current stream, so CUDA graphs capture it."""
    if not available(q.device):
        raise RuntimeError(f"pixtral_fast CUDA decode extension unavailable: {status()}")
    return _launch(q, k_cache, v_cache, block_table, seq_lens, scale, num_splits)


def _launch(q, k_cache, v_cache, block_table, seq_lens, scale, num_splits=None):
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if num_splits is None:
        max_context = block_table.shape[1] * block_size
        num_splits = choose_num_splits(batch, kv_heads, q_heads // kv_heads, max_context,
                                       kernels.sm_count(q.device))
    num_splits = int(num_splits)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    ws_size = batch * q_heads * num_splits * (head_dim + 1) if num_splits > 1 else 0
    workspace = torch.empty(ws_size, device=q.device, dtype=torch.float32)
    if batch == 0:
        return out
    stream = torch.cuda.current_stream(q.device).cuda_stream
    torch.ops.pixtral_fast.gqa_decode_attention_cuda(q, k_cache, v_cache, block_table, seq_lens, float(scale),
                                                     num_splits, out, workspace, stream)
    return out
