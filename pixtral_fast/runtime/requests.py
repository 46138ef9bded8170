"""What the engine takes and hands back: how a call's argument is read (one request or a batch),
completions, the request-level error, step statistics and the usage snapshot."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from pixtral_fast.tokenizer import Encoded


class RequestError(ValueError):
    """This request cannot be served (the message says why); other requests are unaffected."""


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made: `arguments` is the text of a JSON object."""
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Completion:
    """One request's result, from Engine.generate and AsyncEngine.generate alike."""
    text: str                   # stop strings applied: the text before the first one found
    tokens: list[int]           # the new token ids (a final stop token included)
    prompt_tokens: int
    finish_reason: str          # "stop" | "length" | "tool_calls" | "error" | "abort" (a stream closed early)
    error: str | None = None
    stop_reason: str | int | None = None  # finish "stop": the stop string matched, or the stop token id
    logprobs: list[Any] = field(default_factory=list)  # TokenLogprobs per new token, when asked for
    tool_calls: list[ToolCall] = field(default_factory=list)  # finish "tool_calls": the calls (text "")


@dataclass(frozen=True)
class EngineUsage:
    """What the engine holds at one moment (Engine.usage)."""
    running: int                # sequences in the running batch
    waiting: int                # added, not running: queued, not yet queued, or preempted
    used_blocks: int            # KV cache blocks held by sequences
    total_blocks: int           # KV cache blocks in all (the scratch block excluded)


@dataclass
class EngineStats:
    """Wall time of prefill and decode steps (each ends in a host read of the sampled tokens, so
    GPU work is included)."""
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_images: int = 0
    vit_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    encoder_cache_hits: int = 0       # images whose embeddings came from the encoder cache
    encoder_cache_misses: int = 0     # images the ViT encoded
    encoder_cache_evictions: int = 0  # encoder cache entries dropped to make room


def is_batch(request: Any) -> bool:
    """A list of messages (dicts or mistral_common message objects) is one conversation; a list
    of requests (message lists, ChatCompletionRequest objects, Encoded) is a batch."""
    if not isinstance(request, list) or not request:
        return False
    kinds = {isinstance(r, (list, ChatCompletionRequest, Encoded)) for r in request}
    if kinds == {True, False}:
        raise ValueError("a list mixes requests (message lists, ChatCompletionRequest, Encoded) with single "
                         "messages: pass one conversation, or a list of requests")
    return kinds == {True}


def describe_failure(e: BaseException) -> str:
    """A ValueError's message is meant for the user as is; anything else is named by its type."""
    return str(e) if isinstance(e, ValueError) and str(e) else f"{type(e).__name__}: {e}"


def image_tensors(images: Any) -> list[torch.Tensor]:
    """Encoded.images as tensors; ValueError naming images / images[i] and what it got, rather
    than a raw torch error, or a lone [3, H, W] tensor silently taken for 3 images (its channels)."""
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of [3, H, W] pixel arrays (numpy or torch), "
                         f"got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, (np.ndarray, torch.Tensor)):
            raise ValueError(f"images[{i}] must be a [3, H, W] pixel array (numpy or torch), "
                             f"got {type(img).__name__}")
    # Plain tensors, cut from autograd: a user's tensor subclass must not travel in a tensor-parallel
    # step message (a worker may be unable to unpickle it, which would stop every rank).
    return [torch.as_tensor(img).detach().as_subclass(torch.Tensor) for img in images]
