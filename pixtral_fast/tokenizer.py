"""A thin wrapper over mistral_common: chat messages with images -> token ids + image tensors.

Tokenization and image preprocessing (resizing, normalisation, the [IMG]/[IMG_BREAK]/[IMG_END]
layout) are mistral_common's; this module turns user-friendly inputs into its request objects,
hands it images it can convert (pixtral_fast.images), and turns every failure on user input into
a ValueError that says what is wrong, never one of mistral_common's own exception types."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydantic
from mistral_common.protocol.instruct.messages import (AssistantMessage, ImageChunk, ImageURLChunk,
                                                      SystemMessage, TextChunk, UserMessage)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken
from PIL import Image

from pixtral_fast.images import DEFAULT_MAX_IMAGE_PIXELS, load_image
from pixtral_fast.weights import CheckpointError

__all__ = ["Encoded", "Tokenizer", "load_image", "to_request"]

ImageLoader = Callable[[Any, str], Image.Image]
TEKKEN_NAMES = ("tekken.json", "tekken_240911.json")
SENTENCEPIECE_MM = re.compile(r"\.model\.v\d+m\d+$")  # mistral_common's multimodal SentencePiece names


@dataclass
class Encoded:
    tokens: list[int]
    images: list[np.ndarray]  # float32 [3, H, W], as mistral_common returns them


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: a text part needs a string 'text', got {type(value).__name__}")
    return value


def _chunks(content: Any, where: str, load: ImageLoader) -> list:
    if isinstance(content, str):
        return [TextChunk(text=content)]
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if isinstance(part, (TextChunk, ImageChunk, ImageURLChunk)):
            out.append(_own_chunk(part, at, load))
            continue
        if not isinstance(part, dict) or "type" not in part:
            raise ValueError(f"{at}: expected a dict with a 'type'")
        kind = part["type"]
        if kind == "text":
            out.append(TextChunk(text=_text(part.get("text"), at)))
        elif kind == "image":
            out.append(ImageChunk(image=load(part.get("image"), at)))
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise ValueError(f"{at}: an image_url part needs image_url.url, a non-empty string")
            out.append(ImageChunk(image=load(url, at)))
        else:
            raise ValueError(f"{at}: unknown part type {kind!r} (text, image, image_url)")
    return out


def _own_chunk(chunk: Any, where: str, load: ImageLoader) -> Any:
    """mistral_common chunks with their images loaded here (caps, modes, no URL fetching)."""
    if isinstance(chunk, ImageChunk):
        return ImageChunk(image=load(chunk.image, where))
    if isinstance(chunk, ImageURLChunk):
        return ImageChunk(image=load(chunk.get_url(), where))
    return chunk


def _system_or_assistant(content: Any, where: str) -> Any:
    """A string, None, or a list of text parts (dicts or TextChunks)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, TextChunk):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(TextChunk(text=_text(part.get("text"), f"{where}.content[{j}]")))
        else:
            raise ValueError(f"{where}.content[{j}]: only text parts are allowed here")
    return parts


def _message(m: Any, where: str, load: ImageLoader) -> Any:
    if isinstance(m, UserMessage):
        content = m.content if isinstance(m.content, str) else [_own_chunk(c, f"{where}.content[{j}]", load)
                                                                for j, c in enumerate(m.content)]
        return m.model_copy(update={"content": content})
    if isinstance(m, (AssistantMessage, SystemMessage)) or not isinstance(m, dict):
        return m  # anything else is refused by ChatCompletionRequest's validation, with its message
    role = m.get("role")
    if role == "user":
        return UserMessage(content=_chunks(m.get("content"), where, load))
    if role == "assistant":
        return AssistantMessage(content=_system_or_assistant(m.get("content"), where))
    if role == "system":
        content = _system_or_assistant(m.get("content"), where)
        if content is None:
            raise ValueError(f"{where}: a system message needs content")
        return SystemMessage(content=content)
    raise ValueError(f"{where}: role must be user, assistant or system, got {role!r}")


def to_request(messages: Any, load: ImageLoader = load_image) -> ChatCompletionRequest:
    """A ChatCompletionRequest from one, or from a list of OpenAI-style dicts / mistral_common
    messages; every image goes through `load` (a ChatCompletionRequest's own included)."""
    if isinstance(messages, ChatCompletionRequest):
        return messages.model_copy(update={"messages": [_message(m, f"messages[{i}]", load)
                                                        for i, m in enumerate(messages.messages)]})
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a ChatCompletionRequest or a non-empty list of messages")
    return ChatCompletionRequest(messages=[_message(m, f"messages[{i}]", load) for i, m in enumerate(messages)])


def user_error(e: Exception) -> ValueError:
    """A plain ValueError saying what mistral_common (or pydantic) found wrong with the request."""
    if type(e) is ValueError:
        return e
    if isinstance(e, pydantic.ValidationError):
        details = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or e.title}: {err['msg']}" for err in e.errors())
        return ValueError(f"the request is malformed ({e.title}): {details}")
    return ValueError(f"the request cannot be tokenized: {e} ({type(e).__name__})")


@functools.cache
def _default_mistral() -> MistralTokenizer:
    """Read once per process (a 19 MB file, seconds to parse); it holds no per-request state."""
    return MistralTokenizer.v3(is_tekken=True, is_mm=True)


class Tokenizer:
    def __init__(self, mistral: MistralTokenizer):
        self.mistral = mistral
        self.tekken = mistral.instruct_tokenizer.tokenizer
        encoder = mistral.instruct_tokenizer.image_encoder
        if encoder is None:
            raise ValueError("this tokenizer has no image settings; Pixtral needs a multimodal Tekken file")
        self.max_image_side: int = encoder.image_config.max_image_size
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    @property
    def max_image_pixels(self) -> int:
        """Input images with more pixels are refused, from their header before decoding
        (default and why: pixtral_fast.images.DEFAULT_MAX_IMAGE_PIXELS)."""
        return self._max_image_pixels

    @max_image_pixels.setter
    def max_image_pixels(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"max_image_pixels must be a positive int, got {value!r}")
        self._max_image_pixels = value

    @classmethod
    def default(cls) -> "Tokenizer":
        """The Tekken tokenizer of Pixtral-12B-2409 that ships inside mistral_common (no download)."""
        return cls(_default_mistral())

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """A multimodal Tekken file, or a multimodal SentencePiece file (Pixtral-Large's
        tokenizer.model.v7m1); CheckpointError naming the file for anything else."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such tokenizer file")
        if is_sentencepiece(path):
            return cls._from_sentencepiece(path)
        if not is_tekken(path):  # mistral_common tells the format by the name
            raise CheckpointError(f"{path}: a Tekken tokenizer file must be named *tekken*.json")
        try:
            mistral = MistralTokenizer.from_file(str(path))
        except MemoryError:
            raise
        except Exception as e:  # JSONDecodeError, KeyError, TokenizerException, AssertionError, ...
            raise CheckpointError(f"{path} is not a valid Tekken tokenizer file ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
        if not isinstance(mistral.instruct_tokenizer.tokenizer, Tekkenizer):
            raise CheckpointError(f"{path} is not a Tekken tokenizer; Pixtral needs a multimodal Tekken tokenizer")
        if mistral.instruct_tokenizer.image_encoder is None:
            raise CheckpointError(f"{path} has no image settings; Pixtral needs a multimodal Tekken tokenizer")
        return cls(mistral)

    @classmethod
    def _from_sentencepiece(cls, path: Path) -> "Tokenizer":
        """Only a multimodal SentencePiece file (`.model.vNmM`: the image settings are in the name)."""
        if not SENTENCEPIECE_MM.search(path.name):
            raise CheckpointError(f"{path} is a SentencePiece tokenizer without image settings; Pixtral needs a "
                                  "multimodal one (tekken.json, or a SentencePiece tokenizer.model.vNmM such as "
                                  "Pixtral-Large's tokenizer.model.v7m1)")
        try:
            mistral = MistralTokenizer.from_file(str(path))
        except MemoryError:
            raise
        except ImportError:
            raise CheckpointError(f"{path} is a SentencePiece tokenizer, which needs the sentencepiece package "
                                  "(pip install 'mistral_common[sentencepiece]')") from None
        except Exception as e:
            raise CheckpointError(f"{path} is not a valid SentencePiece tokenizer file ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
        if mistral.instruct_tokenizer.image_encoder is None:
            raise CheckpointError(f"{path} has no image settings; Pixtral needs a multimodal tokenizer")
        return cls(mistral)

    @classmethod
    def for_checkpoint(cls, folder: str | Path) -> "Tokenizer":
        """The checkpoint's tokenizer: its Tekken file, else its SentencePiece file (Pixtral-Large's
        tokenizer.model.v7m1; multimodal ones first); Pixtral-12B-2409's Tekken when it has neither."""
        folder = Path(folder)
        if folder.is_file():
            folder = folder.parent  # a params.json / config.json path
        for name in TEKKEN_NAMES:
            if (folder / name).is_file():
                return cls.from_file(folder / name)
        spm = sorted(folder.glob("tokenizer.model*"), key=lambda p: (not SENTENCEPIECE_MM.search(p.name), p.name))
        if spm:
            return cls.from_file(spm[0])
        return cls.default()

    def check_matches(self, vision) -> None:
        """CheckpointError unless this tokenizer lays images out as the model's vision config
        reads them: the same [IMG]/[IMG_BREAK]/[IMG_END] ids, patch size and merge size (a mismatch
        would otherwise surface only as wrong token counts, request by request)."""
        encoder = self.mistral.instruct_tokenizer.image_encoder
        ids, cfg = encoder.special_ids, encoder.image_config
        pairs = {"image_token_id": (ids.img, vision.image_token_id),
                 "image_break_token_id": (ids.img_break, vision.image_break_token_id),
                 "image_end_token_id": (ids.img_end, vision.image_end_token_id),
                 "patch_size": (cfg.image_patch_size, vision.patch_size),
                 "spatial_merge_size": (cfg.spatial_merge_size, vision.spatial_merge_size)}
        wrong = [f"{name}: tokenizer {ours}, model {theirs}" for name, (ours, theirs) in pairs.items() if ours != theirs]
        if wrong:
            raise CheckpointError("the tokenizer does not match the model's vision config (" + "; ".join(wrong) + ")")

    @property
    def eos_id(self) -> int:
        return self.tekken.eos_id

    @property
    def bos_id(self) -> int:
        return self.tekken.bos_id

    def load_image(self, image: Any, where: str = "image") -> Image.Image:
        return load_image(image, where, self.max_image_pixels, self.max_image_side)

    def encode(self, request_or_messages: Any) -> Encoded:
        """Tokens and preprocessed images; ValueError for anything wrong with the request."""
        try:
            encoded = self.mistral.encode_chat_completion(to_request(request_or_messages, self.load_image))
        except MemoryError:
            raise
        except Exception as e:
            raise user_error(e) from None
        return Encoded(tokens=list(encoded.tokens), images=list(encoded.images))

    def decode(self, ids: list[int]) -> str:
        return self.tekken.decode(list(ids))
