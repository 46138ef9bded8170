"""Argument checks and the launch-device context shared by the public ops (pixtral_fast.ops and
pixtral_fast.quant.ops, which ops.py re-exports: a module of its own, so neither imports the other
for them)."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

from pixtral_fast import kernels

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


def interpreter_active() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1 when the kernels were imported)."""
    return kernels.INTERPRETING


def kernels_can_run(device: torch.device | str) -> bool:
    """True where our Triton kernels run: a CUDA device, or the CPU under the interpreter."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreter_active())


def same_place(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def runnable(name: str, t: torch.Tensor) -> None:
    if not kernels_can_run(t.device):
        raise ValueError(f"{name} is on {t.device}: pixtral_fast kernels need a CUDA device, or "
                         "TRITON_INTERPRET=1 on the CPU; pixtral_fast.reference has the same ops in plain PyTorch")


def positive_real(name: str, value) -> float:
    """A finite real number > 0 (theta, scale), as a float; a NaN or negative one would give NaN
    or nonsense output silently, and a str or bool is a caller's mistake, not a number."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a finite real number > 0, got {value!r}")
    return float(value)
