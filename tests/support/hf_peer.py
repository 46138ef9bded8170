"""HF transformers' Llava + Pixtral as the independent oracle: a tiny random model, its weights
scaled so that activations are O(1) (HF's 0.02-std init would make every logit near zero and any
comparison vacuous), saved with save_pretrained."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pixtral_fast.config import IMG_BREAK_ID, IMG_END_ID, IMG_ID


def randomize(model, seed: int) -> None:
    """Norms 1 + 0.1 N(0, 1), biases 0.1 N(0, 1), embeddings N(0, 1), matrices N(0, 1/fan_in):
    activations O(1), and a skipped norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))


def tiny_hf_model(seed: int = 0, vocab: int = 512):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, head_dim=64, image_size=1024, patch_size=16,
                                 rope_theta=10000.0, hidden_act="silu")
    text = MistralConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=vocab, rope_theta=1e9,
                         rms_norm_eps=1e-5, max_position_embeddings=4096, sliding_window=None,
                         tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG_ID,
                         projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="full", multimodal_projector_bias=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    randomize(model, seed)
    return model


def save_tiny_hf(folder: Path, seed: int = 0) -> Path:
    tiny_hf_model(seed).save_pretrained(folder)
    return folder


def image_tokens(rows: int, cols: int) -> list[int]:
    """DESIGN §1: [IMG] per patch, [IMG_BREAK] after each row, the last one replaced by [IMG_END]."""
    out = []
    for r in range(rows):
        out += [IMG_ID] * cols + [IMG_BREAK_ID if r < rows - 1 else IMG_END_ID]
    return out


BOS, INST, END_INST = 1, 3, 4


def prompt(*grids: tuple[int, int], text=(300, 301, 302, 303, 304)) -> torch.Tensor:
    """[BOS][INST], the image tokens of each (rows, cols) grid, the text, [/INST]."""
    tokens = [BOS, INST]
    for rows, cols in grids:
        tokens += image_tokens(rows, cols)
    return torch.tensor(tokens + list(text) + [END_INST])


def image(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A random [3, 16*rows, 16*cols] image: rows x cols patches of the tiny model's 16 px."""
    return torch.randn(3, 16 * rows, 16 * cols, generator=torch.Generator().manual_seed(seed))


# The parity cases: (grids, images) per name; images of different aspects, so that a transposed
# grid or a misplaced [IMG_BREAK] shows.
IMAGE_CASES = {
    "text_only": ([], []),
    "one_non_square_image": ([(3, 5)], [image(3, 5, 1)]),
    "two_images_different_aspect": ([(2, 6), (5, 3)], [image(2, 6, 2), image(5, 3, 3)]),
}


def hf_inputs(images: list[torch.Tensor]) -> dict:
    """HF's image arguments: images padded into one batch, with their true sizes alongside."""
    if not images:
        return {}
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    pixels = torch.zeros(len(images), 3, h, w)
    for j, img in enumerate(images):
        pixels[j, :, : img.shape[1], : img.shape[2]] = img
    return dict(pixel_values=pixels, image_sizes=torch.tensor([list(i.shape[1:]) for i in images]))


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
    """HF's logits [seq, vocab]."""
    return model(input_ids=tokens[None], **hf_inputs(images)).logits[0].float()
