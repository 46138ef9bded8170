"""The one message parser: OpenAI-style message dicts, mistral_common message objects or a
ChatCompletionRequest (with OpenAI `tools`, tool results and assistant tool calls) -> a Prompt:
mistral_common's messages with each image still a source, decoded later under the caller's
MediaLimits (decode_images). The library (Tokenizer.encode) and the server (which fetches and
decodes the images itself, then hands the Prompt to Tokenizer.encode) read messages the same way.
Every failure on user input is an InputError naming where it sits in the request."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pydantic
from mistral_common.protocol.instruct.messages import (AssistantMessage, ImageChunk, ImageURLChunk,
                                                      SystemMessage, TextChunk, ToolMessage, UserMessage)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from PIL import Image

from pixtral_fast.images import MediaLimits, load_image, shown

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's bound on a function's name


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
