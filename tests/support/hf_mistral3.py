"""HF transformers' Mistral3ForConditionalGeneration (Mistral-Small-3.1/3.2: Pixtral ViT, RMSNorm,
2x2 patch merger, bias-free adapter) and a Pixtral-Large-shaped Llava as independent oracles:
tiny random models with activations O(1) and random norm weights (HF's 0.02-std init and unit
norms would let a skipped norm or a wrong merger ordering pass unnoticed), saved with save_pretrained.

The ViT head_dim of the Large-shaped model is 24 (not a power of two), as Pixtral-Large's 104 is.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pixtral_fast.config import IMG_ID
from tests.support.hf_peer import randomize

PATCH_SMALL = 14   # Mistral-Small-3.x patch size
MERGE = 2          # Mistral-Small-3.x spatial_merge_size


def _text_config(vocab: int, rope_theta: float):
    from transformers import MistralConfig

    return MistralConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=32, vocab_size=vocab, rope_theta=rope_theta,
                         rms_norm_eps=1e-5, max_position_embeddings=4096, sliding_window=None,
                         tie_word_embeddings=False)


def tiny_mistral3(seed: int = 0, vocab: int = 512):
    """A Mistral-Small-3.1-shaped Mistral3ForConditionalGeneration: patch 14, merge 2, pre-merger
    norm, adapter without bias, GQA 6/2, untied output."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, head_dim=64, image_size=1540, patch_size=PATCH_SMALL,
                                 rope_theta=10000.0, hidden_act="silu")
    config = Mistral3Config(vision_config=vision, text_config=_text_config(vocab, 1e9), image_token_index=IMG_ID,
                            projector_hidden_act="gelu", vision_feature_layer=-1, spatial_merge_size=MERGE,
                            multimodal_projector_bias=False, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    randomize(model, seed)
    _check_untied(model.lm_head, model.model.language_model.embed_tokens)
    return model


def tiny_pixtral_large(seed: int = 0, vocab: int = 512):
    """A Pixtral-Large-shaped Llava: patch 16, no merger, adapter without bias, ViT head_dim 24 (not a
    power of two), GQA group 3, decoder theta 1e6."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=24, image_size=1024, patch_size=16, rope_theta=10000.0, hidden_act="silu")
    config = LlavaConfig(vision_config=vision, text_config=_text_config(vocab, 1e6), image_token_index=IMG_ID,
                         projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
                         multimodal_projector_bias=False, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    randomize(model, seed)
    _check_untied(model.lm_head, model.model.language_model.embed_tokens)
    return model


def _check_untied(lm_head, embed) -> None:
    # transformers 5 ties Mistral3's lm_head unless the top-level config says otherwise: a tied peer
    # would compare our untied output against the embedding matrix.
    if lm_head.weight.data_ptr() == embed.weight.data_ptr():
        raise RuntimeError("the HF peer's lm_head is tied to its embeddings; expected an untied output")


BUILDERS = {"mistral-small-3.1": tiny_mistral3, "pixtral-large": tiny_pixtral_large}


def save_tiny(folder: Path, variant: str, seed: int = 0) -> Path:
    BUILDERS[variant](seed).save_pretrained(folder)
    return folder


def merged_image_tokens(rows: int, cols: int) -> list[int]:
    """[IMG] layout over a *merged* grid of rows x cols tokens (DESIGN §1 with issue 10)."""
    from tests.support.hf_peer import image_tokens

    return image_tokens(rows, cols)


def image_for_merged_grid(rows: int, cols: int, seed: int, patch: int = PATCH_SMALL, merge: int = MERGE):
    """Pixels [3, H, W] whose patch grid merges to rows x cols tokens (H = rows * patch * merge)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, rows * patch * merge, cols * patch * merge, generator=g)


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
    """HF's logits [seq, vocab] (images padded into one batch with their true sizes, as HF's processors do)."""
    from tests.support.hf_peer import hf_logits as llava_logits

    return llava_logits(model, tokens, images)
