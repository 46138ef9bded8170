"""What a quantized model holds and what one decode step reads, counted on the meta device from
the real module structure (QuantLinear buffers; pixtral_fast.model.quantized.build_quantized_meta_model),
without any weights: for planning, and for the
issue's budget (Pixtral-12B, W4A16 group 128: <= 9.5 GB held; FP8: <= 14.6 GB)."""
from __future__ import annotations

_DECODE_PREFIXES = ("layers.", "norm.", "output.")  # the embedding table is read one row per token


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
