"""Function calling: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` compiled by llguidance
(as runtime/structured_output.py compiles response_format) into a grammar over the checkpoint's
vocabulary, so that a call is well-formed and its arguments follow the tool's `parameters` by
construction, whatever the weights; and the calls read back from the sampled token ids.

The layout is Pixtral-12B's Tekken v3 (mistral_common's InstructTokenizerV3): the model calls tools
with the special token [TOOL_CALLS] followed by the JSON array [{"name": ..., "arguments": {...}},
...] in json.dumps' spacing. mistral_common's own grammar factory supports only Tekken v11 and
newer, so this grammar is built here; tokenizers with another layout (SentencePiece, as
Pixtral-Large's, and Tekken versions other than v3) are refused by name."""
from __future__ import annotations

import json
import random
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mistral_common.protocol.instruct.tool_calls import Tool
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from pixtral_fast.runtime.requests import ToolCall
from pixtral_fast.runtime.structured_output import Grammar, checked_grammar, load_llguidance
from pixtral_fast.messages import InputError, parse_tools, shown_value

SUPPORTED_TEKKEN_VERSIONS = ("v3",)
CALLS_TOKEN = "[TOOL_CALLS]"
CALL_ID_CHARS = string.ascii_letters + string.digits
CALL_ID_LENGTH = 9  # Tekken v3's tool call ids: 9 letters or digits
# The model's calls in json.dumps' spacing, as mistral_common writes them in the prompt; no other
# whitespace, so that bounded arguments make a bounded call.
CALL_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FREE_TEXT = "/(?s:.*)/"  # any text: the grammar names no special token, so none can appear in it
CHOICES = ("none", "auto", "required")
SCHEMA_VALUES = ("const", "enum", "default", "examples")  # keywords whose content is data, not schema


@dataclass(frozen=True)
class ToolGrammar:
    """One request's tools compiled: the tools for the prompt, the grammar whose .constraint()
    each request (or choice) gets, and how to read the calls back."""
    tools: list[Tool]
    grammar: Grammar
    calls_token: int
    decode: Callable[[list[int]], str]  # the tokenizer's: token ids -> text

    def constraint(self):
        return self.grammar.constraint()

    def parse(self, tokens: list[int], stop_token_ids, seed: int | None) -> list[ToolCall]:
        """The calls in a request's new tokens (its final stop token dropped): none unless they
        start with [TOOL_CALLS] and the array after it is complete (not cut short by max_tokens)."""
        body = list(tokens)
        if body and body[-1] in stop_token_ids:
            body.pop()
        if not body or body[0] != self.calls_token:
            return []
        try:
            calls = json.loads(self.decode(body[1:]))
        except ValueError:
            return []
        ids = call_ids(len(calls), seed)
        return [ToolCall(id=i, name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False))
                for i, c in zip(ids, calls)]


def call_ids(count: int, seed: int | None) -> list[str]:
    """Ids of a response's calls: from `seed` when there is one (the same request, the same ids:
    streamed and plain answers agree), else random."""
    rng = random.Random(seed) if seed is not None else secrets.SystemRandom()
    return ["".join(rng.choice(CALL_ID_CHARS) for _ in range(CALL_ID_LENGTH)) for _ in range(count)]


def compile_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any, tokenizer,
                  vocab_size: int) -> ToolGrammar | None:
    """The grammar of a request's tools for a pixtral_fast Tokenizer and a model of `vocab_size`
    logits; None without tools. InputError (a ValueError) whose .param names the field at fault."""
    if tools is None or tools == []:  # an empty list asks for no tools, as OpenAI reads it
        if tool_choice not in (None, "none", "auto"):
            raise InputError("tool_choice", f"tool_choice {shown_value(tool_choice)} needs tools")
        return None
    calls_token = _calls_token(tokenizer)
    parsed = parse_tools(tools)
    choice, forced = _choice(tool_choice, [t.function.name for t in parsed])
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InputError("parallel_tool_calls", "parallel_tool_calls must be true or false")
    callable_tools = [t for t in parsed if forced in (None, t.function.name)]
    lark = _lark(choice, _calls_schema(callable_tools, parallel_tool_calls is not False), calls_token)
    grammar = _compiled(lark, tokenizer, vocab_size, parsed)
    return ToolGrammar(parsed, grammar, calls_token, tokenizer.decode)


def _calls_token(tokenizer) -> int:
    """[TOOL_CALLS]'s id in a tokenizer whose tool layout this module writes; InputError otherwise."""
    tekken = tokenizer.mistral.instruct_tokenizer.tokenizer
    if not isinstance(tekken, Tekkenizer):
        raise InputError("tools", "tools need a Tekken v3 tokenizer (Pixtral-12B's); this checkpoint's is "
                                  "SentencePiece, whose tool-call layout is not supported")
    version = getattr(tekken.version, "value", str(tekken.version))
    if version not in SUPPORTED_TEKKEN_VERSIONS:
        raise InputError("tools", f"tools need a Tekken v3 tokenizer (Pixtral-12B's); this checkpoint's is "
                                  f"Tekken {version}, whose tool-call layout is not supported")
    try:
        return tekken.get_special_token(CALLS_TOKEN)
    except Exception:  # noqa: BLE001 - mistral_common's own exception types vary by version
        raise InputError("tools", f"tools: this tokenizer has no {CALLS_TOKEN} token") from None


def _choice(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    """("none" | "auto" | "required", the one function a named choice forces)."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise InputError("tool_choice", f"tool_choice must be 'none', 'auto', 'required' or "
                                            f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                                            f"got {shown_value(tool_choice)}")
        return tool_choice, None
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function":
        raise InputError("tool_choice", "tool_choice must be a string or {\"type\": \"function\", ...}")
    spec = tool_choice.get("function")
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        raise InputError("tool_choice", "tool_choice.function.name must be a string")
    if name not in names:
        raise InputError("tool_choice", f"tool_choice names the function {shown_value(name)}, which is not "
                                        f"among the tools ({', '.join(names)})")
    return "required", name


def _call_schema(tool: Tool, at: str) -> dict:
    """One call of `tool`, whose schema sits at the JSON pointer `at` of the calls' schema."""
    arguments = _rebased(tool.function.parameters, f"{at}/properties/arguments")
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _rebased(schema: Any, base: str) -> Any:
    """The parameters' local references ("#/$defs/X", as pydantic writes them) pointed at where the
    parameters now sit inside the calls' schema; values (const, enum, ...) are left as they are."""
    if isinstance(schema, list):
        return [_rebased(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + base + value[1:]
        elif key in SCHEMA_VALUES:
            out[key] = value
        else:
            out[key] = _rebased(value, base)
    return out


def _calls_schema(tools: list[Tool], parallel: bool) -> dict:
    if len(tools) == 1:
        items = _call_schema(tools[0], "/items")
    else:
        items = {"anyOf": [_call_schema(t, f"/items/anyOf/{i}") for i, t in enumerate(tools)]}
    schema = {"type": "array", "items": items, "minItems": 1,
              "x-guidance": CALL_JSON_OPTIONS}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _lark(choice: str, calls_schema: dict, calls_token: int) -> str:
    calls = f"<[{calls_token}]> %json {json.dumps(calls_schema)}"
    if choice == "none":
        return f"start: {FREE_TEXT}"
    if choice == "required":
        return f"start: {calls}"
    return f"start: text | calls\ncalls: {calls}\ntext: {FREE_TEXT}"


def _compiled(lark: str, tokenizer, vocab_size: int, tools: list[Tool]) -> Grammar:
    """The grammar, or an InputError naming the first tool whose parameters cannot be compiled."""
    llg = load_llguidance()
    try:
        return checked_grammar(llg.LLMatcher.grammar_from_lark(lark), tokenizer, vocab_size, "tools")
    except ValueError as e:
        error = e
    for i, tool in enumerate(tools):
        alone = llg.LLMatcher.grammar_from_json_schema(json.dumps(tool.function.parameters))
        try:
            checked_grammar(alone, tokenizer, vocab_size, f"tools[{i}].function.parameters: the schema")
        except ValueError as e:
            raise InputError(f"tools[{i}].function.parameters", str(e)) from None
    raise InputError("tools", str(error))
