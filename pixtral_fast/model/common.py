"""Pieces shared by the vision encoder and the decoder: RMSNorm, the SiLU-gated FFN, and the
choice of op backend (pixtral_fast.ops or pixtral_fast.reference, which share signatures)."""
from __future__ import annotations

import logging
import types
from collections.abc import Iterable

import torch
from torch import nn

from pixtral_fast import reference
from pixtral_fast.quant.linear import QuantLinear, fuse_quant_rows

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
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, then * weight: `kernels.rms_norm`, the
    reference's unless the caller passes the model's op backend."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, kernels: types.ModuleType | None = None) -> torch.Tensor:
        return (kernels or reference).rms_norm(x, self.weight, self.eps)

    def after_add(self, x: torch.Tensor, residual: torch.Tensor, kernels: types.ModuleType):
        """(this norm of h, h) with h = x + residual: the residual add and the norm in one op."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


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
    """wq/wk/wv/wo as in the checkpoint (Mistral names), no bias. After fuse_qkv(), one GEMM
    computes q, k and v."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, **kw)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, **kw)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, **kw)
        self.wo = nn.Linear(n_heads * head_dim, dim, **kw)
        self.wqkv: torch.Tensor | None = None  # not a parameter: the state dict keeps wq/wk/wv
        self._fused_rows: tuple = ()

    def fuse_qkv(self) -> bool:
        """Concatenates wq, wk and wv into one [q + 2 kv, dim] weight and re-points the three at
        its rows: no memory is added, the state dict keeps its names. Quantized projections fuse
        alike (quant.linear.fuse_quant_rows: the packed rows shared, the small scales copied);
        False where nothing was fused (mixed or differing projections, the meta device)."""
        if self.fused():
            return True
        parts = (self.wq, self.wk, self.wv)
        if all(isinstance(m, QuantLinear) for m in parts):
            fused = fuse_quant_rows(list(parts))
            if fused is None:
                return False
            object.__setattr__(self, "wqkv", fused)  # not a submodule: the state dict keeps wq/wk/wv
        elif all(type(m) is nn.Linear and m.weight.device.type != "meta" for m in parts):
            weight = torch.cat([m.weight.detach() for m in parts])
            for m, rows in zip(parts, weight.split([m.out_features for m in parts])):
                m.weight = nn.Parameter(rows, requires_grad=m.weight.requires_grad)
            self.wqkv = weight
        else:
            return False
        self._fused_rows = self._rows()
        return True

    def _rows(self) -> tuple:
        return tuple(None if (w := _streamed_weight(m)) is None else w.data_ptr() for m in (self.wq, self.wk, self.wv))

    def fused(self) -> bool:
        """Whether wq, wk and wv still are the fused weight's rows: swapping the modules or their
        weights (quantization, a state-dict load with assign) or converting them (model.to) ends
        the fusion; in-place writes go to the fused weight itself."""
        return self.wqkv is not None and self._rows() == self._fused_rows

    def qkv(self, x: torch.Tensor, kernels: types.ModuleType | None = None):
        t = x.shape[0]
        if self.fused():
            kernels = kernels or reference
            out = self.wqkv.linear(x, kernels) if isinstance(self.wqkv, QuantLinear) else kernels.linear(x, self.wqkv)
            q, k, v = out.split([self.wq.out_features, self.wk.out_features, self.wv.out_features], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        return (q.view(t, self.n_heads, self.head_dim), k.view(t, self.n_kv_heads, self.head_dim),
                v.view(t, self.n_kv_heads, self.head_dim))


def _streamed_weight(module: nn.Module) -> torch.Tensor | None:
    """The tensor a projection streams per token: a dense weight, or a quantized layer's packed one."""
    for name in ("weight", "weight_packed_k128", "weight_packed"):
        w = getattr(module, name, None)
        if isinstance(w, torch.Tensor):
            return w
    return None
