"""Pieces shared by the vision encoder and the decoder: RMSNorm, the SiLU-gated FFN, and the
choice of op backend (pixtral_fast.ops or pixtral_fast.reference, which share signatures)."""
from __future__ import annotations

import logging
import types
from collections.abc import Iterable

import torch
from torch import nn

BACKENDS = ("auto", "fast", "reference")
log = logging.getLogger("pixtral_fast")


def attention_head_dims(args) -> tuple[int, ...]:
    """The head dims a model's attention runs at: the decoder's, and the ViT's if it has one."""
    dims = [args.text.head_dim]
    if getattr(args, "vision", None) is not None:
        dims.append(args.vision.head_dim)
    return tuple(dims)


def resolve_backend(name: str, device: torch.device | str,
                    head_dims: Iterable[int] = ()) -> tuple[str, types.ModuleType]:
    """('fast', pixtral_fast.ops) or ('reference', pixtral_fast.reference): the module whose
    functions implement the ops. 'auto' picks our kernels wherever they can run (CUDA, or the
    CPU under TRITON_INTERPRET=1) and the attention kernels take every head dim in `head_dims`
    (multiples of 8 up to 256); otherwise the reference, with one log line saying why."""
    from pixtral_fast import ops, reference

    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    can_run = ops.kernels_can_run(device)
    if name == "fast" and not can_run:
        raise ValueError(f"backend='fast' needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                         f"the model is on {device}. Use backend='reference' or 'auto'.")
    odd = sorted({d for d in head_dims if not ops.attention_head_dim_ok(d)})
    if odd and name == "fast":
        raise ValueError(f"backend='fast': the attention kernels take head dims that are multiples of 8 up to "
                         f"{ops.MAX_HEAD_DIM}, this model has {odd}. Use backend='reference' or 'auto'.")
    if name == "reference" or (name == "auto" and not can_run):
        return "reference", reference
    if odd:  # name == "auto"
        log.warning("backend='auto' runs the plain-PyTorch reference: head_dim %s is not one the attention "
                    "kernels take (multiples of 8 up to %d)", ", ".join(map(str, odd)), ops.MAX_HEAD_DIM)
        return "reference", reference
    return "fast", ops


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, then * weight."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class FeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x): one fused gated-FFN op."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.w1 = nn.Linear(dim, hidden, **kw)
        self.w2 = nn.Linear(hidden, dim, **kw)
        self.w3 = nn.Linear(dim, hidden, **kw)

    def forward(self, x: torch.Tensor, kernels: types.ModuleType) -> torch.Tensor:
        return kernels.gated_ffn(x, self.w1.weight, self.w3.weight, self.w2.weight, "silu")


class AttentionProjections(nn.Module):
    """wq/wk/wv/wo as in the checkpoint (Mistral names), no bias."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, **kw)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, **kw)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, **kw)
        self.wo = nn.Linear(n_heads * head_dim, dim, **kw)

    def qkv(self, x: torch.Tensor):
        t = x.shape[0]
        return (self.wq(x).view(t, self.n_heads, self.head_dim),
                self.wk(x).view(t, self.n_kv_heads, self.head_dim),
                self.wv(x).view(t, self.n_kv_heads, self.head_dim))
