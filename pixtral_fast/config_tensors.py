"""The tensor table a configuration implies: every weight of the model, by consolidated name, with
its shape. The loaders check a checkpoint's names and shapes against it before reading a byte of
tensor data, so it sits with the configs, below the loaders and the model; the model's own state
dict is held to it by a test (tests/test_weights.py)."""
from __future__ import annotations

import functools

from pixtral_fast.config import ModelArgs
from pixtral_fast.config_sections import TextArgs, VisionArgs

Shapes = dict[str, tuple[int, ...]]


@functools.lru_cache(maxsize=8)
def _tensor_shapes(args: ModelArgs) -> Shapes:
    """ModelArgs is frozen: one table per config serves every load."""
    t = args.text
    shapes: Shapes = {"tok_embeddings.weight": (t.vocab_size, t.dim), "norm.weight": (t.dim,),
                      "output.weight": (t.vocab_size, t.dim)}
    for i in range(t.n_layers):
        shapes |= _layer_shapes(f"layers.{i}.", t.dim, t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim,
                                t.hidden_dim)
    if args.vision is not None:
        shapes |= _vision_shapes(args.vision, t)
    return shapes


def tensor_shapes(args: ModelArgs) -> Shapes:
    """{consolidated name: shape} of every tensor of the whole (unsharded) model `args` describe."""
    return dict(_tensor_shapes(args))


def _layer_shapes(prefix: str, dim: int, q_rows: int, kv_rows: int, hidden: int) -> Shapes:
    """One transformer block: the decoder's and the ViT's have the same names."""
    return {prefix + "attention.wq.weight": (q_rows, dim), prefix + "attention.wk.weight": (kv_rows, dim),
            prefix + "attention.wv.weight": (kv_rows, dim), prefix + "attention.wo.weight": (dim, q_rows),
            prefix + "feed_forward.w1.weight": (hidden, dim), prefix + "feed_forward.w3.weight": (hidden, dim),
            prefix + "feed_forward.w2.weight": (dim, hidden),
            prefix + "attention_norm.weight": (dim,), prefix + "ffn_norm.weight": (dim,)}


def _vision_shapes(v: VisionArgs, t: TextArgs) -> Shapes:
    """The ViT, the optional norm and patch merger, and the adapter into the decoder's width."""
    h = v.hidden_size
    shapes: Shapes = {"vision_encoder.patch_conv.weight": (h, v.num_channels, v.patch_size, v.patch_size),
                      "vision_encoder.ln_pre.weight": (h,)}
    for j in range(v.num_hidden_layers):
        rows = v.num_attention_heads * v.head_dim
        shapes |= _layer_shapes(f"vision_encoder.transformer.layers.{j}.", h, rows, rows, v.intermediate_size)
    if v.add_pre_mm_projector_layer_norm:
        shapes["pre_mm_projector_norm.weight"] = (h,)
    if v.merges_patches:
        shapes["patch_merger.merging_layer.weight"] = (h, h * v.spatial_merge_size ** 2)
    shapes |= {"vision_language_adapter.w_in.weight": (t.dim, h),
               "vision_language_adapter.w_out.weight": (t.dim, t.dim)}
    if v.adapter_bias:
        shapes |= {"vision_language_adapter.w_in.bias": (t.dim,), "vision_language_adapter.w_out.bias": (t.dim,)}
    return shapes
