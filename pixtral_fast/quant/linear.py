"""nn.Modules that hold a linear layer's weights in their quantized form and run them through the
quantized ops: what replaces nn.Linear in a model loaded from a compressed-tensors checkpoint
(swap_quantized_modules, for the packed loader and for quantize_model alike).

State-dict names follow compressed-tensors, under the layer's own name, so a checkpoint's tensors
load as they are: W4A16 `weight_packed` int32 [N, ceil(K/8)] + `weight_scale` [N, K/group];
FP8 `weight` float8_e4m3fn [N, K] + `weight_scale` ([N, 1] or [1]).

Once loaded, a W4A16 layer whose group size the fast kernel takes (a power of two >= 32, or per
channel) is repacked in place (`repack_()`, called by the loader and quantize_model): it then
holds `weight_packed_k128` int32 [N, Kp/8] and `weight_scale_t` [K/group, N] instead (the k128
layout of pixtral_fast.quant.formats, the same bytes for K a multiple of 128), and runs
pixtral_fast.quant.ops.w4a16_linear_k128. The reference backend unpacks that layout back on each
call (the reference op takes the checkpoint's). Other group sizes keep the checkpoint's layout
and the kernel that reads it.

The op backend (pixtral_fast.ops or pixtral_fast.reference) is the owning model's: each
QuantLinear keeps a weak reference to the model and reads `model.kernels` at call time, so
`model.set_backend(...)` switches these layers too. A gated FFN whose w1/w3/w2 are quantized
runs as the unfused trio (QuantFeedForward): each projection streams its packed weights once,
which is what bounds decode; the fused dense kernel would need a quantized twin to save the one
[tokens, hidden] round trip of the intermediate.
"""
from __future__ import annotations

import types
import weakref
from dataclasses import replace

import torch
from torch import nn

from pixtral_fast.config import CheckpointError
from pixtral_fast.quant.config import ACT_FP8_DYNAMIC_TOKEN, WeightScheme
from pixtral_fast.quant.formats import (FP8_DTYPE, K128_BLOCK, k128_layout_ok, packed_words, repack_w4a16_k128,
                                        unrepack_w4a16_k128)
from pixtral_fast.quant.reference import fake_quant_fp8_per_token


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, scale_dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        kw = dict(device=device)
        if scheme.kind == "w4a16":
            self.group_size = scheme.group_size_for(in_features)
            self.register_buffer("weight_packed", torch.empty(out_features, packed_words(in_features),
                                                              dtype=torch.int32, **kw))
            self.register_buffer("weight_scale", torch.empty(out_features, in_features // self.group_size,
                                                             dtype=scale_dtype, **kw))
        elif scheme.kind == "fp8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, **kw))
            scale_shape = (out_features, 1) if scheme.strategy == "channel" else (1,)
            self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=scale_dtype, **kw))
        else:
            raise ValueError(f"scheme.kind must be 'w4a16' or 'fp8', got {scheme.kind!r}")
        self.layout = "compressed-tensors"
        self._owner = None

    @torch.no_grad()
    def repack_(self) -> "QuantLinear":
        """W4A16: the checkpoint's layout -> the k128 kernel's, in place, where the group size allows
        (a no-op otherwise, and for FP8). On the meta device, the buffers' shapes only."""
        if (self.scheme.kind != "w4a16" or self.layout == "k128"
                or not k128_layout_ok(self.group_size, self.in_features)):
            return self
        packed, scales = self.weight_packed, self.weight_scale
        if packed.device.type == "meta":
            kp = -(-self.in_features // K128_BLOCK) * K128_BLOCK
            new_packed = torch.empty(packed.shape[0], kp // 8, dtype=torch.int32, device="meta")
            new_scales = torch.empty(scales.shape[1], scales.shape[0], dtype=scales.dtype, device="meta")
        else:
            new_packed, new_scales = repack_w4a16_k128(packed, scales, self.group_size, self.in_features)
        del self.weight_packed, self.weight_scale
        self.register_buffer("weight_packed_k128", new_packed)
        self.register_buffer("weight_scale_t", new_scales)
        self.layout = "k128"
        return self

    def bind(self, owner: nn.Module) -> None:
        """The model whose `.kernels` this layer runs with."""
        self._owner = weakref.ref(owner)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme.kind == "w4a16" else ""
        return f"{self.in_features} -> {self.out_features}, {self.scheme.kind}{group}, act={self.scheme.activation}"

    def linear(self, x: torch.Tensor, kernels: types.ModuleType) -> torch.Tensor:
        if self.scheme.kind == "w4a16":
            if self.layout != "k128":
                return kernels.w4a16_linear(x, self.weight_packed, self.weight_scale, self.group_size)
            from pixtral_fast.quant import ops as quant_ops

            if kernels.w4a16_linear is quant_ops.w4a16_linear:  # the fast backend
                return quant_ops.w4a16_linear_k128(x, self.weight_packed_k128, self.weight_scale_t, self.group_size)
            packed, scales = unrepack_w4a16_k128(self.weight_packed_k128, self.weight_scale_t, self.in_features)
            return kernels.w4a16_linear(x, packed, scales, self.group_size)
        if self.scheme.activation == ACT_FP8_DYNAMIC_TOKEN:  # W8A8 checkpoint: inputs as it quantizes them
            x = fake_quant_fp8_per_token(x)
        return kernels.fp8_linear(x, self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            raise RuntimeError("QuantLinear is not bound to a model: call pixtral_fast.quant.linear.bind_quant_layers")
        return self.linear(x, owner.kernels)


def _replace_buffer(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module._buffers[name] = tensor  # a buffer re-pointed (a view of a fused tensor), keeping its name


def fuse_quant_rows(layers: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear whose output is the layers' outputs side by side (their rows concatenated:
    they read the same input), for one GEMM instead of several. The packed rows of each layer
    become rows of the fused weight (views: no memory added for them, the state dict unchanged);
    the scales are small and the fused layer keeps its own copy (W4A16's k128 layout stores them
    transposed, where a layer's share would not be contiguous). FP8 per-tensor scales become one
    scale per row, exactly. None where the layers cannot fuse (schemes, group sizes, layouts or
    input widths that differ, or weights on the meta device)."""
    first = layers[0]
    if any(m.scheme != first.scheme or m.layout != first.layout or m.in_features != first.in_features
           for m in layers):
        return None
    rows_name = streamed_name(first)
    scale_name = "weight_scale_t" if rows_name == "weight_packed_k128" else "weight_scale"
    if any(getattr(m, rows_name).device.type == "meta" for m in layers):
        return None
    rows = torch.cat([getattr(m, rows_name) for m in layers])
    scheme = first.scheme
    if first.scheme.kind == "w4a16":
        scale_dim = 1 if first.layout == "k128" else 0
        scales = torch.cat([getattr(m, scale_name) for m in layers], dim=scale_dim)
    else:
        scales = torch.cat([m.weight_scale.reshape(-1, 1).expand(m.out_features, 1) for m in layers])
        scheme = replace(first.scheme, strategy="channel")
    fused = QuantLinear(first.in_features, rows.shape[0], scheme, scales.dtype, device="meta")
    fused.layout = first.layout
    for name in list(fused._buffers):
        del fused._buffers[name]
    fused.register_buffer(rows_name, rows)
    fused.register_buffer(scale_name, scales.contiguous())
    for m, part in zip(layers, rows.split([m.out_features for m in layers])):
        _replace_buffer(m, rows_name, part)
    return fused


class QuantFeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x) with quantized projections; called as FeedForward is. After
    fuse_gate_up(), one GEMM computes gate and up side by side, and silu_mul reads its two halves
    in place."""

    def __init__(self, w1: QuantLinear, w2: QuantLinear, w3: QuantLinear):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3
        self.w13: QuantLinear | None = None  # not a submodule: the state dict keeps w1/w3
        self._fused_rows: tuple = ()

    def fuse_gate_up(self) -> bool:
        """w1 and w3 as one QuantLinear (fuse_quant_rows: their packed rows shared); False where
        they cannot fuse."""
        if self.fused():
            return True
        fused = fuse_quant_rows([self.w1, self.w3])
        if fused is None:
            return False
        object.__setattr__(self, "w13", fused)
        self._fused_rows = self._rows()
        return True

    def _rows(self) -> tuple:
        return tuple(m._buffers[streamed_name(m)].data_ptr() for m in (self.w1, self.w3))

    def fused(self) -> bool:
        """Whether w1 and w3 still are the fused layer's rows (swapping or converting them ends it)."""
        return self.w13 is not None and self._rows() == self._fused_rows

    def forward(self, x: torch.Tensor, kernels: types.ModuleType) -> torch.Tensor:
        if self.fused():
            gate_up = self.w13.linear(x, kernels)
            gate, up = gate_up.split([self.w1.out_features, self.w3.out_features], dim=-1)
        else:
            gate, up = self.w1.linear(x, kernels), self.w3.linear(x, kernels)
        hidden = kernels.silu_mul(gate, up)  # fp32 product, rounded once, one launch
        return self.w2.linear(hidden, kernels)


def streamed_name(layer: QuantLinear) -> str:
    """The buffer a quantized layer streams per token: its packed weight."""
    if layer.scheme.kind != "w4a16":
        return "weight"
    return "weight_packed_k128" if layer.layout == "k128" else "weight_packed"


# -- a model's linears swapped for these (the packed loader's model and quantize_model's) -------------

def swap_quantized_modules(model: nn.Module, schemes: dict[str, WeightScheme], scale_dtype) -> None:
    """Replaces the nn.Linear of every quantized module (consolidated name) with a QuantLinear (on
    the meta device: load_state_dict(assign=True) fills it), and a feed-forward whose three
    projections are quantized with a QuantFeedForward. scale_dtype: one dtype, or a callable of
    the module name giving it."""
    ffns: dict[str, dict[str, QuantLinear]] = {}
    for cons, scheme in schemes.items():
        parent_name, attr = cons.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, attr)
        if getattr(dense, "bias", None) is not None:
            raise CheckpointError(f"{cons}: quantized layers with a bias are not supported (keep it dense: ignore)")
        dtype = scale_dtype(cons) if callable(scale_dtype) else scale_dtype
        layer = QuantLinear(dense.in_features, dense.out_features, scheme, dtype, device="meta")
        if parent_name.endswith("feed_forward"):
            ffns.setdefault(parent_name, {})[attr] = layer
        else:
            setattr(parent, attr, layer)
    for name, layers in ffns.items():
        if set(layers) != {"w1", "w2", "w3"}:
            raise CheckpointError(f"{name}: w1, w2 and w3 must be quantized together (found {sorted(layers)})")
        owner_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner_name), attr, QuantFeedForward(layers["w1"], layers["w2"], layers["w3"]))


def bind_quant_layers(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.bind(model)


def repack_quant_layers(model: nn.Module) -> None:
    """Every W4A16 layer the fast kernel takes, into its k128 layout (QuantLinear.repack_)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.repack_()
