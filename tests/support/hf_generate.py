"""The transformers side of an exported HF folder: chat messages -> model inputs -> greedy tokens,
as a transformers user (or vLLM) would get them, for comparing with our engine.

transformers 5 imports PixtralProcessor only with torchvision, which has no CPU build that
matches our CPU torch here. Without it `hf_inputs` uses the folder's other files the way
PixtralProcessor does: the tokenizer's chat template (one [IMG] per image), the image processor
(pixel values and sizes), each [IMG] expanded to the rows of [IMG]...[IMG_BREAK] its image
occupies (the layout mistral_common writes and Pixtral reads), then the tokenizer. `uses_processor`
says which path a run took."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def uses_processor() -> bool:
    """Whether AutoProcessor can build Pixtral's processor here (it needs torchvision)."""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def hf_inputs(folder: str | Path, messages: list[dict]) -> Any:
    """input_ids, attention_mask, pixel_values and image_sizes (pt) for one chat."""
    if uses_processor():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder).apply_chat_template(
            messages, add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt")
    return _inputs_without_processor(Path(folder), messages)


def _inputs_without_processor(folder: Path, messages: list[dict]) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "processor_config.json").read_text())
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    images = [part["image"] for m in messages if isinstance(m["content"], list)
              for part in m["content"] if part["type"] == "image"]
    if not images:
        return BatchFeature(dict(tokenizer(text, add_special_tokens=False, return_tensors="pt")))
    pixels = AutoImageProcessor.from_pretrained(folder)(
        images, patch_size=config["patch_size"] * config["spatial_merge_size"], return_tensors="pt")
    pieces = text.split(config["image_token"])
    if len(pieces) != len(images) + 1:
        raise ValueError(f"the chat template wrote {len(pieces) - 1} {config['image_token']} for {len(images)} images")
    side = config["patch_size"] * config["spatial_merge_size"]
    expanded = pieces[0]
    for (h, w), piece in zip(pixels["image_sizes"].tolist(), pieces[1:]):
        rows = [config["image_token"] * (w // side) + config["image_break_token"]] * (h // side)
        expanded += "".join(rows)[:-len(config["image_break_token"])] + config["image_end_token"] + piece
    encoded = tokenizer(expanded, add_special_tokens=False, return_tensors="pt")
    return BatchFeature({**encoded, "pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]})


def hf_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """The exported model (Llava or Mistral3, whichever config.json names), in eval mode."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()


@torch.no_grad()
def hf_greedy(folder: str | Path, messages_list: list[list[dict]], max_new_tokens: int,
              dtype: torch.dtype = torch.float32, device: str = "cpu", model: Any = None) -> list[list[int]]:
    """Greedy new token ids for each chat, one chat at a time (no padding to get wrong); stops at
    max_new_tokens or at the eos of the folder's generation_config.json, as our engine does."""
    model = hf_model(folder, dtype, device) if model is None else model
    out = []
    for messages in messages_list:
        inputs = hf_inputs(folder, messages).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out
