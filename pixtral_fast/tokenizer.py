"""A thin wrapper over mistral_common: chat messages with images -> token ids + image tensors.

Tokenization and image preprocessing (resizing, normalisation, the [IMG]/[IMG_BREAK]/[IMG_END]
layout) are mistral_common's; this module turns user-friendly inputs into its request objects,
hands it images it can convert (pixtral_fast.images), and turns every failure on user input into
a ValueError that says what is wrong, never one of mistral_common's own exception types.

parse_messages is the one message parser: the library (Tokenizer.encode) and the server (which
fetches and decodes the images of the Prompt it returns under its own MediaLimits, then hands the
Prompt to Tokenizer.encode) read messages the same way."""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from mistral_common.protocol.instruct.messages import (AssistantMessage, ImageChunk, ImageURLChunk,
                                                      SystemMessage, TextChunk, ToolMessage, UserMessage)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken
from PIL import Image

from pixtral_fast.images import DEFAULT_MAX_IMAGE_PIXELS, MediaLimits, load_image, shown
from pixtral_fast.weights import CheckpointError

__all__ = ["Encoded", "ImageSource", "InputError", "Prompt", "Tokenizer", "decode_images", "load_image",
           "parse_messages", "parse_tools", "to_request", "WithTools"]

TEKKEN_NAMES = ("tekken.json", "tekken_240911.json")
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's bound on a function's name
SENTENCEPIECE_MM = re.compile(r"\.model\.v\d+m\d+$")  # mistral_common's multimodal SentencePiece names


@dataclass
class Encoded:
    tokens: list[int]
    images: list[np.ndarray]  # float32 [3, H, W], as mistral_common returns them


class InputError(ValueError):
    """A bad message or image; `param` is where it sits in the request (the server's error param)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class WithTools:
    """A request (messages or a ChatCompletionRequest) whose prompt shows the model OpenAI `tools`
    (parse_tools); Tokenizer.encode reads it as it reads the request, tools added."""
    request: Any
    tools: Any


@dataclass
class ImageSource:
    """One image of a prompt: what the caller gave (a URL, path, bytes or PIL image), where it
    sits in the request (errors name it), the bytes fetched for an http(s) URL, the decoded image."""
    source: Any
    param: str
    data: bytes | None = None
    image: Image.Image | None = field(default=None, repr=False)


@dataclass
class _PendingUser:
    """A user message whose images are not decoded yet: text chunks and ImageSources."""
    content: list


@dataclass
class Prompt:
    """Checked messages with their images noted in order, not yet decoded (the server fetches and
    decodes them elsewhere). `request`: the caller's own ChatCompletionRequest, whose other fields
    are kept."""
    messages: list
    images: list[ImageSource]
    request: ChatCompletionRequest | None = None
    tools: list[Tool] | None = None  # parse_tools'; None keeps the request's own (if any)

    def to_request(self) -> ChatCompletionRequest:
        """The mistral_common request, every image decoded (decode_images) beforehand."""
        undecoded = [s.param for s in self.images if s.image is None]
        if undecoded:
            raise ValueError(f"the prompt's images are not decoded ({', '.join(undecoded)}): decode_images first")
        messages = [UserMessage(content=[ImageChunk(image=c.image) if isinstance(c, ImageSource) else c
                                         for c in m.content]) if isinstance(m, _PendingUser) else m
                    for m in self.messages]
        tools = {} if self.tools is None else {"tools": self.tools}
        if self.request is not None:
            return self.request.model_copy(update={"messages": messages, **tools})
        return ChatCompletionRequest(messages=messages, **tools)


def parse_messages(messages: Any, limits: MediaLimits, tools: Any = None) -> Prompt:
    """The one message parser: OpenAI-style dicts (and, from a program, mistral_common messages
    or a ChatCompletionRequest) checked, with their images noted; InputError naming what is wrong.
    A server's client (limits.server) gives only dicts, and images only as image_url parts.
    `tools`: OpenAI's list of functions (parse_tools), shown to the model in the prompt."""
    request = messages if isinstance(messages, ChatCompletionRequest) else None
    if request is not None:
        messages = request.messages
    elif isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list) or not messages:
        raise InputError("messages", "messages must be a ChatCompletionRequest or a non-empty list of messages")
    images: list[ImageSource] = []
    parsed = [_message(m, f"messages[{i}]", limits, images) for i, m in enumerate(messages)]
    most = limits.max_images_per_prompt
    if most is not None and len(images) > most:
        raise InputError("messages", f"messages: {len(images)} images in the prompt; at most {most} are allowed "
                                     f"({limits.setting('max_images_per_prompt')})")
    return Prompt(parsed, images, request, None if tools is None else parse_tools(tools))


def parse_tools(tools: Any) -> list[Tool]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description", "parameters",
    "strict"}}], or mistral_common Tools) as mistral_common's; InputError naming the entry."""
    if not isinstance(tools, list) or not tools:
        raise InputError("tools", "tools: must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    parsed = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    names = [t.function.name for t in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError("tools", f"tools: the function name(s) {repeated} appear more than once")
    return parsed


def _tool(tool: Any, where: str) -> Tool:
    if isinstance(tool, Tool):
        return tool
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InputError(where, f"{where}: a tool must be an object with type 'function'")
    spec = tool.get("function")
    if not isinstance(spec, dict):
        raise InputError(f"{where}.function", f"{where}.function: must be an object with a 'name'")
    name = spec.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise InputError(f"{where}.function.name", f"{where}.function.name: must be 1 to 64 letters, digits, "
                                                   f"'_' or '-', got {shown_value(name)}")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise InputError(f"{where}.function.description", f"{where}.function.description: must be a string")
    parameters = spec.get("parameters")
    if parameters is None:  # OpenAI: a function without parameters takes none
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise InputError(f"{where}.function.parameters", f"{where}.function.parameters: must be a JSON Schema "
                                                         f"object, got {type(parameters).__name__}")
    return Tool(function=Function(name=name, description=description, parameters=parameters))


def _message(m: Any, where: str, limits: MediaLimits, images: list[ImageSource]) -> Any:
    if isinstance(m, UserMessage):
        if isinstance(m.content, str):
            return m
        return _PendingUser([_own_chunk(c, f"{where}.content[{j}]", images) for j, c in enumerate(m.content)])
    if not isinstance(m, dict):
        if limits.server:
            raise InputError(where, f"{where}: a message must be an object with a role")
        return m  # anything else is refused by ChatCompletionRequest's validation, with its message
    role = m.get("role")
    if role == "user":
        return _PendingUser(_chunks(m.get("content"), where, limits, images))
    if role == "assistant":
        calls = m.get("tool_calls")
        content = _system_or_assistant(m.get("content"), where)
        if not calls:
            return AssistantMessage(content=content)
        return AssistantMessage(content=content or None, tool_calls=_tool_calls(calls, f"{where}.tool_calls"))
    if role == "tool":
        return _tool_message(m, where)
    if role in ("system", "developer"):  # developer: OpenAI's newer name for the system message
        content = _system_or_assistant(m.get("content"), where)
        if content is None:
            raise InputError(f"{where}.content", f"{where}: a system message needs content")
        return SystemMessage(content=content)
    raise InputError(f"{where}.role", f"{where}: role must be user, assistant, system or tool, "
                                      f"got {shown_value(role)}")


def _tool_calls(calls: Any, where: str) -> list[ToolCall]:
    """An assistant message's OpenAI tool_calls: [{"id", "type": "function", "function": {"name",
    "arguments": a JSON object's text}}]."""
    if not isinstance(calls, list):
        raise InputError(where, f"{where}: must be a list of tool calls")
    return [_tool_call(c, f"{where}[{j}]") for j, c in enumerate(calls)]


def _tool_call(call: Any, at: str) -> ToolCall:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise InputError(at, f"{at}: a tool call must be an object with type 'function'")
    call_id, spec = call.get("id"), call.get("function")
    if not isinstance(call_id, str) or not call_id:
        raise InputError(f"{at}.id", f"{at}.id: must be a non-empty string")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise InputError(f"{at}.function", f"{at}.function: must be an object with a string 'name'")
    arguments = spec.get("arguments", "{}")
    try:
        loaded = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError as e:
        raise InputError(f"{at}.function.arguments", f"{at}.function.arguments: not valid JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{at}.function.arguments", f"{at}.function.arguments: must be a JSON object")
    return ToolCall(id=call_id, function=FunctionCall(name=spec["name"], arguments=json.dumps(loaded)))


def _tool_message(m: dict, where: str) -> ToolMessage:
    """A tool's result, sent back to the model: its text and the id of the call it answers."""
    call_id = m.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InputError(f"{where}.tool_call_id", f"{where}: a tool message needs tool_call_id, a non-empty string")
    content = _system_or_assistant(m.get("content"), where)
    if content is None:
        raise InputError(f"{where}.content", f"{where}: a tool message needs content")
    text = content if isinstance(content, str) else "".join(part.text for part in content)
    return ToolMessage(content=text, tool_call_id=call_id)


def shown_value(value: Any) -> str:
    """A client's value in an error message: a string quoted and cut (it may be megabytes),
    anything else by its type only (its repr may be as large, and slow to build)."""
    return shown(value) if isinstance(value, str) else f"a {type(value).__name__}"


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}.text", f"{where}: a text part needs a string 'text', got {type(value).__name__}")
    return value


def _chunks(content: Any, where: str, limits: MediaLimits, images: list[ImageSource]) -> list:
    if isinstance(content, str):
        return [TextChunk(text=content)]
    if not isinstance(content, list):
        raise InputError(f"{where}.content", f"{where}.content must be a string or a list of parts, "
                                             f"got {type(content).__name__}")
    if not content:
        raise InputError(f"{where}.content", f"{where}.content: the list of parts is empty; give a string or "
                                             "at least one part")
    return [_part(part, f"{where}.content[{j}]", limits, images) for j, part in enumerate(content)]


def _part(part: Any, at: str, limits: MediaLimits, images: list[ImageSource]) -> Any:
    if isinstance(part, (TextChunk, ImageChunk, ImageURLChunk)):
        return _own_chunk(part, at, images)
    if not isinstance(part, dict) or "type" not in part:
        raise InputError(at, f"{at}: expected a dict with a 'type'")
    kind = part["type"]
    if kind == "text":
        return TextChunk(text=_text(part.get("text"), at))
    if kind == "image" and not limits.server:  # a client may not name a path or hand over objects
        return _image(part.get("image"), at, images)
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        param = f"{at}.image_url.url"
        if not isinstance(url, str) or not url:
            raise InputError(param, f"{at}: an image_url part needs image_url.url, a non-empty string")
        return _image(url, param if limits.server else at, images)
    kinds = "text, image_url" if limits.server else "text, image, image_url"
    raise InputError(at, f"{at}: unknown part type {shown_value(kind)} ({kinds})")


def _image(source: Any, param: str, images: list[ImageSource]) -> ImageSource:
    """param: where the image's own errors point (the server's param names the URL itself)."""
    image = ImageSource(source, param)
    images.append(image)
    return image


def _own_chunk(chunk: Any, where: str, images: list[ImageSource]) -> Any:
    """mistral_common chunks with their images loaded here (caps, modes, no URL fetching)."""
    if isinstance(chunk, ImageChunk):
        return _image(chunk.image, where, images)
    if isinstance(chunk, ImageURLChunk):
        return _image(chunk.get_url(), where, images)
    return chunk


def _system_or_assistant(content: Any, where: str) -> Any:
    """A string, None, or a list of text parts (dicts or TextChunks)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"{where}.content", f"{where}.content must be a string or a list of text parts, "
                                             f"got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, TextChunk):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(TextChunk(text=_text(part.get("text"), f"{where}.content[{j}]")))
        else:
            raise InputError(f"{where}.content[{j}]", f"{where}.content[{j}]: only text parts are allowed here")
    return parts


def decode_images(images: list[ImageSource], limits: MediaLimits, max_side: int | None) -> None:
    """Decodes every image of a prompt (blocking) through the one decoder (pixtral_fast.images),
    prepared for the model's `max_side`; InputError naming the image."""
    for s in images:
        try:
            given = s.data if s.data is not None else s.source
            s.image = load_image(given, s.param, max_side=max_side, limits=limits)
        except ValueError as e:  # names the image already
            raise InputError(s.param, str(e)) from None


def to_request(messages: Any, limits: MediaLimits | None = None, max_side: int | None = 1024) -> ChatCompletionRequest:
    """A ChatCompletionRequest from one, or from a list of OpenAI-style dicts / mistral_common
    messages; every image decoded under `limits` (the library's by default)."""
    limits = limits or MediaLimits()
    prompt = parse_messages(messages, limits)
    decode_images(prompt.images, limits, max_side)
    return prompt.to_request()


def user_error(e: Exception) -> ValueError:
    """A plain ValueError saying what mistral_common (or pydantic) found wrong with the request."""
    if type(e) is ValueError:
        return e
    if isinstance(e, InputError):
        return ValueError(str(e))
    if isinstance(e, pydantic.ValidationError):
        details = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or e.title}: {err['msg']}" for err in e.errors())
        return ValueError(f"the request is malformed ({e.title}): {details}")
    return ValueError(f"the request cannot be tokenized: {e} ({type(e).__name__})")


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
