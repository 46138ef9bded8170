"""What a quantized model holds and what one decode step reads, counted on the meta device from
the real module structure (QuantLinear buffers), without any weights: for planning, and for the
issue's budget (Pixtral-12B, W4A16 group 128: <= 9.5 GB held; FP8: <= 14.6 GB)."""
from __future__ import annotations

import re

import torch

from pixtral_fast.quant.config import FLOAT_QUANTIZED, PACK_QUANTIZED, WeightScheme
from pixtral_fast.quant.loading import swap_quantized_modules

_DECODER = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])$")
_VISION = re.compile(r"^vision_encoder\.transformer\.layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])$")
_DECODE_PREFIXES = ("layers.", "norm.", "output.")  # the embedding table is read one row per token


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
    from pixtral_fast.model.pixtral import build_model

    model = build_model(args, device="meta", dtype=dtype)
    ws = weight_scheme(scheme, group_size)
    swap_quantized_modules(model, {name: ws for name in quantizable_linears(model, include_vision)}, dtype)
    return model


def _tensors(model):
    yield from model.named_parameters()
    yield from model.named_buffers()


def held_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for _, t in _tensors(model))


def decode_step_bytes(model) -> int:
    """Weight bytes one decode step reads at batch 1: the decoder layers, the final norm, lm_head,
    and one row of the embedding table (KV-cache reads not included)."""
    total = sum(t.numel() * t.element_size() for name, t in _tensors(model) if name.startswith(_DECODE_PREFIXES))
    emb = model.tok_embeddings.weight
    return total + emb.shape[1] * emb.element_size()
