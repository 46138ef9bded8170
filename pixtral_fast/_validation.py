"""Argument checks and the launch-device context shared by the public ops (pixtral_fast.ops and
pixtral_fast.quant.ops, which ops.py re-exports: a module of its own, so neither imports the other
for them)."""
from __future__ import annotations

import contextlib

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    """t itself, or a ValueError naming the argument: not a tensor, wrong rank, wrong dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def on_device(t: torch.Tensor):
    """Launch on t's GPU, not the current one (a model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
