"""A thin wrapper over mistral_common: chat messages with images -> token ids + image tensors.

Tokenization and image preprocessing (resizing, normalisation, the [IMG]/[IMG_BREAK]/[IMG_END]
layout) are mistral_common's; this module turns user-friendly inputs into its request objects,
hands it images it can convert (pixtral_fast.images), and turns every failure on user input into
a ValueError that says what is wrong, never one of mistral_common's own exception types.

The one message parser is pixtral_fast/messages.py; its public names are re-exported here."""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken
from PIL import Image

from pixtral_fast.images import DEFAULT_MAX_IMAGE_PIXELS, MediaLimits, load_image
from pixtral_fast.messages import (ImageSource, InputError, Prompt, WithTools, decode_images, parse_messages,
                                   parse_tools, to_request, user_error)
from pixtral_fast.weights import CheckpointError

__all__ = ["Encoded", "ImageSource", "InputError", "Prompt", "Tokenizer", "decode_images", "load_image",
           "parse_messages", "parse_tools", "to_request", "WithTools"]

TEKKEN_NAMES = ("tekken.json", "tekken_240911.json")
SENTENCEPIECE_MM = re.compile(r"\.model\.v\d+m\d+$")  # mistral_common's multimodal SentencePiece names


@dataclass
class Encoded:
    tokens: list[int]
    images: list[np.ndarray]  # float32 [3, H, W], as mistral_common returns them


def tekken_file() -> Path:
    """Pixtral-12B-2409's Tekken file as mistral_common ships it (the default tokenizer's file)."""
    return Path(str(resources.files("mistral_common") / "data" / "tekken_240911.json"))


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

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most bytes of text one token stands for: a text of B bytes is at least
        B / longest_token_bytes tokens, a bound known without tokenizing it."""
        piece = self.tekken.id_to_byte_piece
        return max(len(piece(i, "keep")) for i in range(self.tekken.n_words))

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

    @property
    def media_limits(self) -> MediaLimits:
        """The library's bounds on images: this tokenizer's pixel cap, any local path."""
        return MediaLimits(max_image_pixels=self.max_image_pixels)

    def load_image(self, image: Any, where: str = "image") -> Image.Image:
        return load_image(image, where, max_side=self.max_image_side, limits=self.media_limits)

    def encode(self, request_or_messages: Any, tools: Any = None) -> Encoded:
        """Tokens and preprocessed images; ValueError for anything wrong with the request. A Prompt
        (parse_messages) comes with its images decoded already (the server decodes them under its
        own limits); anything else is parsed and its images decoded here, under the library's.
        `tools`: OpenAI's (parse_tools), shown to the model in the prompt."""
        if isinstance(request_or_messages, WithTools):
            return self.encode(request_or_messages.request, request_or_messages.tools)
        try:
            prompt = request_or_messages
            if not isinstance(prompt, Prompt):
                prompt = self._prompt(request_or_messages, tools)
            elif tools is not None:
                prompt = dataclasses.replace(prompt, tools=parse_tools(tools))
            encoded = self.mistral.encode_chat_completion(prompt.to_request())
        except MemoryError:
            raise
        except Exception as e:
            raise user_error(e) from None
        return Encoded(tokens=list(encoded.tokens), images=list(encoded.images))

    def _prompt(self, request_or_messages: Any, tools: Any = None) -> Prompt:
        prompt = parse_messages(request_or_messages, self.media_limits, tools)
        decode_images(prompt.images, self.media_limits, self.max_image_side)
        return prompt

    def decode(self, ids: list[int]) -> str:
        return self.tekken.decode(list(ids))
