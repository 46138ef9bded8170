"""Builds tests/support/decode_attention_emu.cpp (the CUDA kernels of csrc/ under the host
emulation of cuda_host_emu.h) with the host compiler and calls it through ctypes on CPU tensors."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SUPPORT = Path(__file__).resolve().parent
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}  # PF_DTYPE_* in csrc/decode_attention_api.h


class PfDecodeArgs(ctypes.Structure):
    """Mirror of PfDecodeArgs (csrc/decode_attention_api.h); its size is checked against C's."""
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "out",
                                              "workspace")]
        + [(name, ctypes.c_int32) for name in ("dtype", "batch", "q_heads", "kv_heads", "head_dim", "block_size",
                                               "max_blocks", "num_splits")]
        + [(name, ctypes.c_int64) for name in ("q_stride_b", "q_stride_h", "out_stride_b", "out_stride_h",
                                               "kv_stride_block", "kv_stride_token", "kv_stride_head",
                                               "block_table_stride")]
        + [("scale", ctypes.c_float)]
    )


def build(out_dir: Path, cuda_home: Path) -> ctypes.CDLL:
    """Compiles the harness (about 5 s) and checks the struct layout both sides agree on."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise FileNotFoundError("no host C++ compiler (g++)")
    lib_path = out_dir / "libdecode_attention_emu.so"
    cmd = [cxx, "-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread",
           f"-I{cuda_home / 'include'}", f"-I{CSRC}", f"-I{SUPPORT}",
           str(SUPPORT / "decode_attention_emu.cpp"), "-o", str(lib_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    lib = ctypes.CDLL(str(lib_path))
    lib.pf_emu_gqa_decode_attention.argtypes = [ctypes.POINTER(PfDecodeArgs)]
    assert lib.pf_emu_args_size() == ctypes.sizeof(PfDecodeArgs), "PfDecodeArgs layout differs from C"
    return lib


def gqa_decode_attention(lib: ctypes.CDLL, q, k_cache, v_cache, block_table, seq_lens, scale, num_splits):
    """Runs the emulated split + merge kernels. out and the workspace start as NaN, so anything the
    kernels fail to write, or read before writing, shows."""
    batch, q_heads, head_dim = q.shape
    out = torch.full_like(q, float("nan"))
    workspace = torch.full((batch * q_heads * num_splits * (head_dim + 1) if num_splits > 1 else 0,),
                           float("nan"))
    args = PfDecodeArgs(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), workspace.data_ptr() if num_splits > 1 else None,
        DTYPE_CODES[q.dtype], batch, q_heads, k_cache.shape[2], head_dim, k_cache.shape[1], block_table.shape[1],
        num_splits, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_table.stride(0), scale,
    )
    rc = lib.pf_emu_gqa_decode_attention(ctypes.byref(args))
    if rc != 0:
        raise RuntimeError(f"emulated launcher returned {rc}")
    return out
