"""The wire format of the OpenAI chat-completions API: the body's JSON, the request model
(pydantic, strict types, finite floats, null as the default), OpenAI-style errors, and the
response / stream-chunk builders."""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pixtral_fast.runtime.output import stop_strings as checked_stop_strings

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
MAX_N = 16            # choices per request
MAX_INT_DIGITS = 20   # an integer in a body: enough for any int64 or uint64
INT64_MIN, UINT64_MAX = -2**63, 2**64 - 1
MIN_LOGPROB = -9999.0  # -inf (an impossible token) is not valid JSON; OpenAI's clients see a floor
MAX_MESSAGES = 1024   # messages per request
MAX_PARTS = 1024      # content parts per request, all messages together
LOCATE_LONG_INT_BYTES = 256 << 10  # up to this body size, a too long integer's field is named
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{%d,}" % (MAX_INT_DIGITS + 1))
# an integer literal's digits: not a float's integer part, fraction or exponent
_LONG_INT_DIGITS = re.compile(rb"(?<![0-9.eE+])(?<![eE]-)[0-9]{%d,}(?![0-9.eE])" % (MAX_INT_DIGITS + 1))
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
IMAGE_PART_TYPES = ("image_url", "image")


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with this status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class WireModel(BaseModel):
    """A JSON object of the API: strict types, unknown fields ignored, and null for a field that
    has a default is that default (as OpenAI reads it)."""
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if not (v is None and k in cls.model_fields and not cls.model_fields[k].is_required())}


class StreamOptions(WireModel):
    include_usage: bool = False


class ChatRequest(WireModel):
    """The fields we serve; others an OpenAI client may send are ignored, unless they ask for
    something we do not do (then 400 rather than a silently different answer)."""

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: FiniteFloat = Field(default=1.0, ge=0.0)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)                     # extension (vLLM's): 0 or -1 = no limit
    seed: int | None = Field(default=None, ge=INT64_MIN, le=UINT64_MAX)   # int64 or uint64
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None                                  # accepted and ignored
    response_format: Any = None                              # runtime/structured_output.py checks it
    tools: Any = None                                        # runtime/tool_calls.py checks these three
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    # asked-for features we do not have: refused by name
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    frequency_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    # extensions and newer OpenAI fields that would change the answer: refused unless neutral
    min_tokens: Any = None
    repetition_penalty: Any = None
    ignore_eos: Any = None
    stop_token_ids: Any = None
    best_of: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def stop_strings(self) -> list[str]:
        """The engine's own bounds (runtime/output.py), answered as a 400 naming `stop`."""
        try:
            return list(checked_stop_strings(self.stop))
        except ValueError as e:
            raise APIError(400, str(e), "stop") from None

    def check_supported(self) -> None:
        for name in ("functions", "function_call", "logit_bias"):  # (functions: tools' deprecated form)
            if getattr(self, name) not in (None, [], {}, "none", "auto"):
                raise APIError(400, f"{name} is not supported by this server", name)
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise APIError(400, f"{name} is not supported by this server (only 0)", name)
        for name, neutral in NEUTRAL_VALUES.items():
            if getattr(self, name) not in neutral:
                raise APIError(400, f"{name} is not supported by this server", name)
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                                f"({self.max_completion_tokens}) differ; give one of them", "max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed with stream: true", "stream_options")


# Each field the server does not implement, with the values that ask for nothing (accepted).
NEUTRAL_VALUES: dict[str, tuple] = {
    "min_tokens": (None, 0), "repetition_penalty": (None, 1, 1.0), "ignore_eos": (None, False),
    "stop_token_ids": (None, []), "best_of": (None, 1), "modalities": (None, ["text"]),
    "audio": (None,), "prediction": (None,), "web_search_options": (None,),
}


class _LongInt:
    """An integer literal too long to convert, refused by parse_json."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))


def parse_json(body: bytes) -> Any:
    """The body's JSON; a 400 for invalid JSON, too deep nesting or an integer literal of more
    than MAX_INT_DIGITS digits (Python refuses to convert thousands of digits with a ValueError,
    and no field takes an integer that large). Cheap: C-speed scans find a long digit run outside
    strings first; only a small body with one is parsed again to name the integer's field."""
    run = _long_int_literal(body)
    if run is None:
        return _loads(body)
    if len(body) > LOCATE_LONG_INT_BYTES:
        raise _long_int_error(len(run), None)
    return _parse_naming_long_int(body)


def _loads(body: bytes, **hooks) -> Any:
    try:
        return json.loads(body, **hooks)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is too deeply nested JSON") from None


def _long_int_literal(body: bytes) -> bytes | None:
    """The first run of more than MAX_INT_DIGITS digits outside JSON strings, if any."""
    if _LONG_DIGIT_RUN.search(body) is None:   # the common case: one scan
        return None
    found = _LONG_INT_DIGITS.search(_JSON_STRING.sub(b'""', body))
    return None if found is None else found.group()


def _long_int_error(digits: int, param: str | None) -> APIError:
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}an integer of {digits} digits; integers in a request have at most "
                         f"{MAX_INT_DIGITS} digits (64 bits)", param)


def _parse_naming_long_int(body: bytes) -> Any:
    long_ints: list[_LongInt] = []

    def parse_int(literal: str) -> int | _LongInt:
        if len(literal.lstrip("-")) <= MAX_INT_DIGITS:
            return int(literal)
        long_ints.append(_LongInt(literal))
        return long_ints[-1]

    payload = _loads(body, parse_int=parse_int)
    found = _first_long_int(payload) if long_ints else None
    if found is None:  # a repeated key replaced it
        return payload
    path, value = found
    raise _long_int_error(value.digits, _param_path(path))


def _first_long_int(payload: Any) -> tuple[tuple, _LongInt] | None:
    """Where the first _LongInt is (depth first, in document order), and it."""
    stack: list[tuple[tuple, Any]] = [((), payload)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _LongInt):
            return path, value
        if isinstance(value, dict):
            stack += [((*path, k), v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [((*path, i), v) for i, v in reversed(list(enumerate(value)))]
    return None


def _param_path(path: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content', as the other errors name parameters."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
    return text or None


def parse_request(payload: Any, max_images: int | None = None) -> ChatRequest:
    """The request, its sizes checked before any per-message work (at most MAX_MESSAGES messages,
    MAX_PARTS content parts and `max_images` image parts)."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_message_counts(payload.get("messages"), max_images)
    try:
        request = ChatRequest.model_validate(payload)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    request.check_supported()
    return request


def check_message_counts(messages: Any, max_images: int | None) -> None:
    """Counts only (len() and one look at each part's type): refuses a request too large to parse."""
    if not isinstance(messages, list):
        return  # the model's validation names what is wrong
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"messages: {len(messages)} messages; at most {MAX_MESSAGES} per request", "messages")
    parts = [m.get("content") for m in messages if isinstance(m, dict)]
    parts = [c for c in parts if isinstance(c, list)]
    total = sum(len(c) for c in parts)
    if total > MAX_PARTS:
        raise APIError(400, f"messages: {total} content parts; at most {MAX_PARTS} per request", "messages")
    images = sum(1 for c in parts for p in c if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES)
    if max_images is not None and images > max_images:
        raise APIError(400, f"messages: {images} images in the prompt; at most {max_images} are allowed "
                            "(--max-images-per-prompt)", "messages")


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's / FastAPI's first error as a 400 naming the parameter."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = "a required field is missing"
    return APIError(400, f"{param}: {message}" if param else message, param)


# -- responses ------------------------------------------------------------------------------------

def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_, "system_fingerprint": None}


def completion_choice(index: int, text: str, finish_reason: str, logprobs: list | None,
                      tool_calls: list[dict] | None = None) -> dict:
    """tool_calls (OpenAI's shape): the message's calls, and then it has no content."""
    message = {"role": "assistant", "content": None if tool_calls else text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason}


def tool_call_delta(index: int, call: dict) -> dict:
    """A streamed call: its id, name and all its arguments in one delta (sent once it is complete)."""
    return {"tool_calls": [{"index": index, **call}]}


def chunk_body(rid: str, created: int, model: str, choices: list[dict], include_usage: bool,
               usage_: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "system_fingerprint": None}
    if include_usage:
        body["usage"] = usage_
    return body


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None) -> dict:
    return {"index": index, "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason}


def models_body(name: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "pixtral-fast", "max_model_len": max_model_len}]}
