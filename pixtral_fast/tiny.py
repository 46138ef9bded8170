"""Tiny checkpoints in the real consolidated format, made from a seed: params.json,
consolidated.safetensors (bf16) and tekken.json (the real Pixtral tokenizer that mistral_common
ships). The vocabulary stays the real 131072 so that every Tekken id decodes. `hf_config` writes
the same model as an HF Llava/Pixtral config.json (no transformers needed)."""
from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from pixtral_fast.config import ModelArgs, TextArgs, VisionArgs
from pixtral_fast.hf_export import llava_config
from pixtral_fast.tokenizer import tekken_file
from pixtral_fast.weights import save_consolidated

TINY_ARGS = ModelArgs(
    text=TextArgs(dim=64, n_layers=2, head_dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2,
                  rope_theta=1e9, norm_eps=1e-5, vocab_size=131072),
    vision=VisionArgs(hidden_size=128, num_channels=3, image_size=1024, patch_size=16, rope_theta=1e4,
                      intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
)
# Mistral-Small-3.1/3.2 in small: patch 14, 1540 px, pre-merger RMSNorm, 2x2 merger, adapter without bias.
TINY_SMALL_31_ARGS = ModelArgs(
    text=TextArgs(dim=64, n_layers=2, head_dim=32, hidden_dim=128, n_heads=4, n_kv_heads=2,
                  rope_theta=1e9, norm_eps=1e-5, vocab_size=131072),
    vision=VisionArgs(hidden_size=128, num_channels=3, image_size=1540, patch_size=14, rope_theta=1e4,
                      intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, adapter_bias=False,
                      spatial_merge_size=2, mm_projector_id="patch_merge", add_pre_mm_projector_layer_norm=True,
                      max_image_size=1540),
)
# Pixtral-Large in small: its ViT head_dim 104 (not a power of two), GQA group 12, theta 1e6, the
# 32768-token SentencePiece vocabulary (whose image break/end tokens are 14/15), adapter without bias.
TINY_LARGE_ARGS = ModelArgs(
    text=TextArgs(dim=96, n_layers=2, head_dim=32, hidden_dim=192, n_heads=12, n_kv_heads=1,
                  rope_theta=1e6, norm_eps=1e-5, vocab_size=32768),
    vision=VisionArgs(hidden_size=208, num_channels=3, image_size=1024, patch_size=16, rope_theta=1e4,
                      intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, adapter_bias=False,
                      image_break_token_id=14, image_end_token_id=15),  # v7m1's [IMG_BREAK], [IMG_END]
)
VARIANTS = {"pixtral-12b": TINY_ARGS, "mistral-small-3.1": TINY_SMALL_31_ARGS, "pixtral-large": TINY_LARGE_ARGS}


def random_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled so that activations stay O(1) through the layers (1/sqrt(fan_in))."""
    from pixtral_fast.model.pixtral import build_model

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in build_model(args, device="meta").state_dict().items():
        shape = tuple(p.shape)
        if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif name == "tok_embeddings.weight":
            t = torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        state[name] = t
    return state


def write_tokenizer(folder: Path, args: ModelArgs) -> None:
    """The tokenizer that goes with `args`, from the files mistral_common ships: Pixtral-12B's Tekken;
    for a merging model the same Tekken with the model's image section (patch, size, merge); for a
    32768-token vocabulary Pixtral-Large's SentencePiece tokenizer.model.v7m1."""
    v = args.vision
    if args.text.vocab_size == 32768:
        shutil.copyfile(resources.files("mistral_common") / "data" / "mistral_instruct_tokenizer_241114.model.v7m1",
                        folder / "tokenizer.model.v7m1")
        return
    if v is None or (v.patch_size, v.image_size, v.spatial_merge_size) == (16, 1024, 1):
        shutil.copyfile(tekken_file(), folder / "tekken.json")
        return
    # The real Small 3.1 tekken.json (a v7 file mistral_common does not ship) carries this image section.
    tekken = json.loads(tekken_file().read_text())
    tekken["image"] = {"image_patch_size": v.patch_size, "max_image_size": v.image_size,
                       "spatial_merge_size": v.spatial_merge_size}
    (folder / "tekken.json").write_text(json.dumps(tekken))


def make_tiny(folder: str | Path, seed: int = 0, args: ModelArgs | None = None, variant: str = "pixtral-12b") -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    args = VARIANTS[variant] if args is None else args
    folder = Path(folder)
    save_consolidated(random_state_dict(args, seed), args, folder)
    write_tokenizer(folder, args)
    return folder


def hf_config(args: ModelArgs = TINY_ARGS) -> dict[str, Any]:
    """The config.json that HF's LlavaForConditionalGeneration saves for this model (the tiny one by default)."""
    return llava_config(args)


def write_hf_config(folder: str | Path, args: ModelArgs = TINY_ARGS) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args), indent=2) + "\n")
    return folder / "config.json"
