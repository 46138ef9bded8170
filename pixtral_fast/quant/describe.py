"""One line saying which quantized weights a model runs and with which kernels, for
Engine.describe() and the bench report: what runs is said, never silently chosen."""
from __future__ import annotations

from collections import Counter

from pixtral_fast.quant.config import ACT_FP8_DYNAMIC_TOKEN


def _layer_label(layer) -> str:
    scheme = layer.scheme
    if scheme.kind == "w4a16":
        label = "w4a16 per-channel" if scheme.strategy == "channel" else f"w4a16 g{layer.group_size}"
    else:
        label = f"fp8 per-{scheme.strategy}"
    if scheme.activation == ACT_FP8_DYNAMIC_TOKEN:
        label += ", inputs fp8 dynamic per token"
    return label


def _kernel(kind: str, backend: str) -> str:
    op = f"{kind}_linear"
    return f"Triton {op}" if backend == "fast" else f"reference {op}: dequantize, then matmul"


def describe_scheme(model) -> str | None:
    """e.g. "w4a16 g128 (Triton w4a16_linear) on 280 of 287 linears", or None for a dense model.
    Layers are grouped by what differs between them (scheme, group, activation quantization), in
    the order they appear; the count of all linears includes the dense ones (lm_head, the ViT)."""
    from torch import nn

    from pixtral_fast.quant.linear import QuantLinear

    modules = list(model.modules())
    quantized = [m for m in modules if isinstance(m, QuantLinear)]
    if not quantized:
        return None
    total = len(quantized) + sum(isinstance(m, nn.Linear) for m in modules)
    backend = getattr(model, "backend", "reference")
    counts = Counter((_layer_label(m), m.scheme.kind) for m in quantized)
    parts = [f"{label} ({_kernel(kind, backend)}) on {n} of {total} linears" for (label, kind), n in counts.items()]
    return "; ".join(parts)
