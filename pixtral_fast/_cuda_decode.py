"""The CUDA decode-attention extension (csrc/): loading it, and its launcher.

`available()` is True once the op `torch.ops.pixtral_fast.gqa_decode_attention_cuda` is
registered: by the prebuilt `pixtral_fast._C` (setup.py builds it wherever nvcc exists), or, on a
machine with a CUDA torch and nvcc but no usable `_C`, by a one-time JIT build of csrc/ with
torch.utils.cpp_extension (cached on disk by torch). A failed build is not swallowed: it is
warned about once, and `status()` returns its message.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import torch

from pixtral_fast import kernels
from pixtral_fast._cuda_home import cuda_home

CSRC = Path(__file__).resolve().parent.parent / "csrc"
MAX_SPLITS = 64  # PF_DECODE_MAX_SPLITS in csrc/decode_attention_api.h
MAX_HEADS_PER_CTA = 8  # kMaxHeadsPerCta in csrc/decode_plan.h
MIN_KEYS_PER_SPLIT = 128  # below this a split's fixed cost (q load, merge) outweighs its keys

_status = "not loaded yet"


def _op_registered() -> bool:
    return hasattr(torch.ops.pixtral_fast, "gqa_decode_attention_cuda")


def _jit_build(cuda: Path) -> None:
    """Builds csrc/ for this GPU's arch and loads it (which registers the op)."""
    import torch.utils.cpp_extension as cpp_extension

    os.environ["CUDA_HOME"] = str(cuda)
    cpp_extension.CUDA_HOME = str(cuda)  # read at import time; the env var may have come too late
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")  # sm_90a on Hopper, as setup.py builds
    print(f"pixtral_fast: building the CUDA decode extension for sm_{arch} (once, about a minute)",
          file=sys.stderr, flush=True)
    # An explicit -gencode makes torch add no arch flags of its own (nor read TORCH_CUDA_ARCH_LIST).
    cpp_extension.load(
        name="pixtral_fast_cuda_decode",
        sources=[str(CSRC / "bindings.cpp"), str(CSRC / "decode_attention.cu")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        is_python_module=False,
        verbose=False,
    )


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the CUDA op is registered in this process (loading or building it once)."""
    global _status
    try:
        from pixtral_fast import _C  # noqa: F401  (registers the op)

        _status = "prebuilt pixtral_fast._C"
        return True
    except ImportError as exc:
        prebuilt_error = f"pixtral_fast._C not importable ({exc})"
    if _op_registered():  # loaded by other means, e.g. an earlier JIT build in this process
        _status = "registered"
        return True
    cuda = cuda_home()
    if not torch.cuda.is_available() or torch.version.cuda is None or cuda is None:
        _status = f"{prebuilt_error}; no JIT build: needs a CUDA torch, a GPU and nvcc"
        return False
    try:
        _jit_build(cuda)
    except Exception as exc:  # reported, not swallowed: decode falls back to Triton loudly
        _status = f"{prebuilt_error}; JIT build of {CSRC} with {cuda} failed: {type(exc).__name__}: {exc}"
        warnings.warn(f"pixtral_fast CUDA decode extension unavailable: {_status}", RuntimeWarning, stacklevel=2)
        return False
    _status = f"JIT-built from {CSRC} with {cuda}"
    return _op_registered()


def status() -> str:
    """How the extension was loaded, or why it was not."""
    return _status


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
    if not available():
        raise RuntimeError(f"pixtral_fast CUDA decode extension unavailable: {status()}")
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
