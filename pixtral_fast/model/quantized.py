"""Quantized variants of a Pixtral: which linears `quantize` covers, the full-size model on the
meta device (planning, memory accounting), and quantizing a loaded dense model in memory
(round-to-nearest, the same arithmetic as `quantize`: tests and benchmarks with random weights).
These build or change a model, so they sit in the model layer; the packed layers and the module
swap they use sit below it, in pixtral_fast/quant/linear.py."""
from __future__ import annotations

import re

import torch

from pixtral_fast.model.pixtral import build_model
from pixtral_fast.quant.config import FLOAT_QUANTIZED, PACK_QUANTIZED, WeightScheme
from pixtral_fast.quant.formats import quantize_fp8, quantize_w4a16
from pixtral_fast.quant.linear import QuantLinear, bind_quant_layers, repack_quant_layers, swap_quantized_modules

_DECODER = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])$")
_VISION = re.compile(r"^vision_encoder\.transformer\.layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])$")


def weight_scheme(scheme: str, group_size: int = 128) -> WeightScheme:
    if scheme == "w4a16":
        return WeightScheme("w4a16", "group", group_size, format=PACK_QUANTIZED)
    if scheme == "fp8":
        return WeightScheme("fp8", "channel", None, format=FLOAT_QUANTIZED)
    raise ValueError(f"scheme must be 'w4a16' or 'fp8', got {scheme!r}")


def quantizable_linears(model, include_vision: bool = False) -> list[str]:
    """The linears `quantize` quantizes: the decoder's (and the ViT's with include_vision)."""
    return [name for name, _ in model.named_modules()
            if _DECODER.match(name) or (include_vision and _VISION.match(name))]


def build_quantized_meta_model(args, scheme: str, group_size: int = 128, include_vision: bool = False,
                               dtype: torch.dtype = torch.bfloat16):
    """The model as loaded from a `quantize` output, on the meta device (scales in `dtype`)."""
    model = build_model(args, device="meta", dtype=dtype)
    ws = weight_scheme(scheme, group_size)
    swap_quantized_modules(model, {name: ws for name in quantizable_linears(model, include_vision)}, dtype)
    repack_quant_layers(model)  # what a loaded model holds (shapes only)
    return model


@torch.no_grad()
def quantize_model(model, scheme: str, group_size: int = 128, include_vision: bool = False):
    """Quantizes a loaded dense Pixtral's linears in place (RTN, scales in the model's dtype) and
    returns it; its backend and device are kept."""
    ws = weight_scheme(scheme, group_size)
    names = quantizable_linears(model, include_vision)
    dense = {name: model.get_submodule(name).weight for name in names}
    state = {}
    for name, w in dense.items():
        if scheme == "w4a16":
            group = ws.group_size_for(w.shape[1])
            state[f"{name}.weight_packed"], state[f"{name}.weight_scale"] = quantize_w4a16(w, group)
        else:
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize_fp8(w, per_channel=True)
    swap_quantized_modules(model, {name: ws for name in names}, model.dtype)
    for name in names:
        layer: QuantLinear = model.get_submodule(name)
        for attr in ("weight_packed", "weight", "weight_scale"):
            if f"{name}.{attr}" in state:
                setattr(layer, attr, state.pop(f"{name}.{attr}"))  # replaces the meta buffer
        layer.repack_()  # (the checkpoint's layout is dropped here, not held twice)
    bind_quant_layers(model)
    return model
