"""The wire format of OpenAI's legacy completions API (POST /v1/completions): the request model,
the prompt (one string or one list of token ids) checked, the legacy logprobs object and the
text_completion bodies and stream chunks. Shared pieces (APIError, strictness, null as the
default, finite logprobs, usage) are serve/protocol.py's."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError

from pixtral_fast.serve.protocol import (INT64_MIN, MAX_N, NEUTRAL_VALUES, UINT64_MAX, APIError, ChatRequest,
                                         FiniteFloat, StreamOptions, WireModel, finite, validation_error)
from pixtral_fast.messages import shown_value

MAX_LOGPROBS = 5            # alternatives per token: OpenAI's bound for the legacy endpoint
DEFAULT_MAX_TOKENS = 16     # OpenAI's (and vLLM's) default for the legacy endpoint
ECHO_LOGPROBS_MAX_TOKENS = 1024  # prompt logprobs need the prompt's [tokens, vocabulary] logits at once
# extensions that would change the answer: accepted only with the values that ask for nothing
NEUTRAL_EXTRAS = ("min_tokens", "repetition_penalty", "ignore_eos", "stop_token_ids", "best_of")


class CompletionRequest(WireModel):
    """The fields we serve; others a client may send are ignored, unless they ask for something
    we do not do (then 400 naming the field rather than a silently different answer)."""

    model: str | None = None
    prompt: Any                                              # checked by prompt_input: a string or token ids
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    temperature: FiniteFloat = Field(default=1.0, ge=0.0)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)                     # extension (vLLM's): 0 or -1 = no limit
    seed: int | None = Field(default=None, ge=INT64_MIN, le=UINT64_MAX)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    user: str | None = None                                  # accepted and ignored
    # asked-for features we do not have: refused by name
    suffix: Any = None
    logit_bias: Any = None
    frequency_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    min_tokens: Any = None
    repetition_penalty: Any = None
    ignore_eos: Any = None
    stop_token_ids: Any = None
    best_of: Any = None

    stop_strings = ChatRequest.stop_strings  # the engine's bounds, a 400 naming `stop`: as on the chat endpoint

    def check_supported(self) -> None:
        for name, neutral in ASKS_FOR_NOTHING.items():
            if getattr(self, name) not in neutral:
                raise APIError(400, f"{name} is not supported by this server{UNSUPPORTED_WHY.get(name, '')}", name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed with stream: true", "stream_options")


# Each field the server does not implement, with the values that ask for nothing (accepted).
ASKS_FOR_NOTHING: dict[str, tuple] = {
    "suffix": (None,), "logit_bias": (None, {}), "frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0),
    **{name: NEUTRAL_VALUES[name] for name in NEUTRAL_EXTRAS}}
UNSUPPORTED_WHY = {"suffix": " (no insertion: the text is only generated after the prompt)",
                   "frequency_penalty": " (only 0)", "presence_penalty": " (only 0)"}


@dataclass
class PromptInput:
    """The request's one prompt: its text (to tokenize) or its token ids, never both."""
    text: str | None = None
    tokens: list[int] | None = None


def parse_request(payload: Any, vocab_size: int) -> tuple[CompletionRequest, PromptInput]:
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(payload)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    request.check_supported()
    return request, prompt_input(request.prompt, vocab_size)


def prompt_input(prompt: Any, vocab_size: int) -> PromptInput:
    """A string, a list of token ids, or a list holding one of those; a 400 naming `prompt` for
    anything else: a batch of several prompts, an empty prompt, ids out of the vocabulary."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise _prompt_error(f"a batch of {len(prompt)} prompts is not supported; send one prompt per "
                                "request (a string or a list of token ids)")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _prompt_error("the prompt is empty")
        return PromptInput(text=prompt)
    if not isinstance(prompt, list):
        raise _prompt_error(f"expected a string or a list of token ids, got {shown_value(prompt)}")
    if not prompt:
        raise _prompt_error("the prompt is empty")
    return PromptInput(tokens=_token_ids(prompt, vocab_size))


def _token_ids(ids: list, vocab_size: int) -> list[int]:
    for i, t in enumerate(ids):
        if type(t) is not int:  # JSON true/false arrive as bool, a subclass of int
            raise _prompt_error(f"prompt[{i}]: a token id must be an integer, got {shown_value(t)}")
        if not 0 <= t < vocab_size:
            raise _prompt_error(f"prompt[{i}]: token id {t} is out of the vocabulary [0, {vocab_size})")
    return ids


def _prompt_error(message: str) -> APIError:
    return APIError(400, message if message.startswith("prompt") else f"prompt: {message}", "prompt")


# -- responses ------------------------------------------------------------------------------------

def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage_, "system_fingerprint": None}


def chunk_body(rid: str, created: int, model: str, choices: list[dict], include_usage: bool,
               usage_: dict | None = None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "system_fingerprint": None}
    if include_usage:
        body["usage"] = usage_
    return body


class LegacyLogprobs:
    """One choice's logprobs in OpenAI's legacy format: {tokens, token_logprobs, top_logprobs,
    text_offset}, the offsets counted in the choice's text (echoed prompt first) across chunks.
    A row is (token id, TokenLogprobs or None: the prompt's first token has no logprob)."""

    def __init__(self, tok, offset: int = 0):
        self.tok, self.offset = tok, offset

    def piece(self, token: int) -> str:
        return self.tok.id_to_byte_piece(token, "keep").decode("utf-8", errors="replace")

    def of(self, rows: list[tuple[int, Any]]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in rows:
            piece = self.piece(token)
            out["tokens"].append(piece)
            out["token_logprobs"].append(None if lp is None else finite(lp.logprob))
            out["top_logprobs"].append(None if lp is None else {self.piece(t): finite(v) for t, v in lp.top})
            out["text_offset"].append(self.offset)
            if not self.tok.is_special(token):  # a control token (BOS, EOS) is not in the text
                self.offset += len(piece)
        return out
