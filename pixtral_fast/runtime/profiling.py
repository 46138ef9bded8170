"""NVTX ranges for Nsight Systems, free when off (a shared null context, no CUDA call)."""
from __future__ import annotations

import contextlib

import torch

_OFF = contextlib.nullcontext()


def nvtx_range(name: str, enabled: bool):
    return torch.cuda.nvtx.range(name) if enabled else _OFF
