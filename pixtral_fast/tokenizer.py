"""A thin wrapper over mistral_common: chat messages with images -> token ids + image tensors.

Tokenization and image preprocessing (resizing, normalisation, the [IMG]/[IMG_BREAK]/[IMG_END]
layout) are mistral_common's; this module only turns user-friendly inputs into its request
objects and turns its failures on bad images into errors that say which image is wrong.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mistral_common.protocol.instruct.messages import (AssistantMessage, ImageChunk, SystemMessage,
                                                      TextChunk, UserMessage)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image, UnidentifiedImageError


@dataclass
class Encoded:
    tokens: list[int]
    images: list[np.ndarray]  # float32 [3, H, W], as mistral_common returns them


def load_image(image: Any, where: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a file path or a data URL; ValueError if it is not one."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, Path)) and str(image).startswith("data:"):
        header, _, payload = str(image).partition(",")
        if ";base64" not in header:
            raise ValueError(f"{where}: only base64 data URLs are supported")
        try:
            img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
            img.load()
        except (binascii.Error, UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where}: the data URL does not hold a readable image ({e})") from None
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{where}: no such image file: {path}")
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"{where}: {path} is not a readable image ({e})") from None
    else:
        raise ValueError(f"{where}: expected a PIL image, a path or a data URL, got {type(image).__name__}")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{where}: image has zero size ({img.width}x{img.height})")
    return img


def _chunks(content: Any, where: str) -> list:
    if isinstance(content, str):
        return [TextChunk(text=content)]
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts")
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise ValueError(f"{at}: expected a dict with a 'type'")
        kind = part["type"]
        if kind == "text":
            out.append(TextChunk(text=part["text"]))
        elif kind == "image":
            out.append(ImageChunk(image=load_image(part.get("image"), at)))
        elif kind == "image_url":
            url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
            out.append(ImageChunk(image=load_image(url, at)))
        else:
            raise ValueError(f"{at}: unknown part type {kind!r} (text, image, image_url)")
    return out


def to_request(messages: Any) -> ChatCompletionRequest:
    """A ChatCompletionRequest from one, or from a list of OpenAI-style dicts / mistral_common messages."""
    if isinstance(messages, ChatCompletionRequest):
        return messages
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a ChatCompletionRequest or a non-empty list of messages")
    converted = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            converted.append(m)
            continue
        role, where = m.get("role"), f"messages[{i}]"
        if role == "user":
            converted.append(UserMessage(content=_chunks(m.get("content"), where)))
        elif role == "assistant":
            converted.append(AssistantMessage(content=m.get("content")))
        elif role == "system":
            converted.append(SystemMessage(content=m.get("content")))
        else:
            raise ValueError(f"{where}: role must be user, assistant or system, got {role!r}")
    return ChatCompletionRequest(messages=converted)


class Tokenizer:
    def __init__(self, mistral: MistralTokenizer):
        self.mistral = mistral
        self.tekken = mistral.instruct_tokenizer.tokenizer
        if mistral.instruct_tokenizer.image_encoder is None:
            raise ValueError("this tokenizer has no image settings; Pixtral needs a multimodal Tekken file")

    @classmethod
    def default(cls) -> "Tokenizer":
        """The Tekken tokenizer of Pixtral-12B-2409 that ships inside mistral_common (no download)."""
        return cls(MistralTokenizer.v3(is_tekken=True, is_mm=True))

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        return cls(MistralTokenizer.from_file(str(path)))

    @classmethod
    def for_checkpoint(cls, folder: str | Path) -> "Tokenizer":
        for name in ("tekken.json", "tekken_240911.json"):
            if (Path(folder) / name).is_file():
                return cls.from_file(Path(folder) / name)
        return cls.default()

    @property
    def eos_id(self) -> int:
        return self.tekken.eos_id

    @property
    def bos_id(self) -> int:
        return self.tekken.bos_id

    def encode(self, request_or_messages: Any) -> Encoded:
        encoded = self.mistral.encode_chat_completion(to_request(request_or_messages))
        return Encoded(tokens=list(encoded.tokens), images=list(encoded.images))

    def decode(self, ids: list[int]) -> str:
        return self.tekken.decode(list(ids))
