"""Structured output: OpenAI's `response_format` compiled by llguidance (mistral_common's own choice,
its `guidance` extra) over the checkpoint's Tekken vocabulary into a grammar, and one matcher per
request that constrains each sampled token (runtime/constraints.py), so that the output is valid
by construction whatever the weights.

JSON is compact: no whitespace between tokens of the document (llguidance's `whitespace_flexible:
false`), so a schema whose strings, arrays and numbers are bounded has a bounded longest document.
Keywords llguidance does not implement are refused by name (ValueError), never ignored in silence;
keywords it does not know at all (annotations such as `title`, `description`) are ignored, as JSON
Schema allows."""
from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pixtral_fast.runtime.sampling import bitmask_words

JSON_OPTIONS = {"whitespace_flexible": False}
MAX_SCHEMA_BYTES = 1 << 20  # a schema's JSON text; a larger one is refused before it is compiled


def load_llguidance():
    try:
        import llguidance
        import llguidance.torch
    except ImportError as e:  # an install without the dependency: say what to install
        raise ValueError("response_format and tools need llguidance (pip install 'mistral_common[guidance]')") from e
    return llguidance


def response_format_schema(response_format: Any) -> dict | None:
    """The JSON schema an OpenAI `response_format` asks for: None for {"type": "text"} (or None),
    {"type": "object"} for {"type": "json_object"}, the given schema for {"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}. ValueError naming what is wrong."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ValueError(f"response_format must be an object with a string 'type', got {_shown(response_format)}")
    kind = response_format["type"]
    extra = set(response_format) - {"type", "json_schema"}
    if extra:
        raise ValueError(f"response_format: unknown field(s) {sorted(extra)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("response_format.json_schema must be an object with 'name' and 'schema'")
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise ValueError(f"response_format.json_schema: unknown field(s) {sorted(unknown)}")
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ValueError("response_format.json_schema.name must be a string of 1 to 64 characters")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise ValueError("response_format.json_schema.strict must be true or false")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ValueError(f"response_format.json_schema.schema must be a JSON Schema object, got {_shown(schema)}")
    return schema


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.lru_cache(maxsize=4)
def _llg_tokenizer(mistral_tokenizer):
    """llguidance's view of a MistralTokenizer's vocabulary (about a second to build: once)."""
    load_llguidance()
    from mistral_common.guidance.tokenizer import from_mistral_tokenizer

    try:
        return from_mistral_tokenizer(mistral_tokenizer)
    except TypeError as e:  # a SentencePiece tokenizer
        raise ValueError("response_format needs a Tekken tokenizer; this checkpoint's is SentencePiece") from e


_BUILD_LOCK = threading.Lock()  # one build of a vocabulary at a time, whichever thread asks first


@dataclass(frozen=True)
class Grammar:
    """A compiled response format over one vocabulary; `constraint()` starts a request's matcher."""
    compiled: Any      # llguidance's grammar
    tokenizer: Any     # llguidance's LLTokenizer
    vocab_size: int    # the model's: its logits' width (at least the tokenizer's words)

    def constraint(self) -> JsonConstraint:
        matcher = load_llguidance().LLMatcher(self.tokenizer, self.compiled, log_level=0)
        if matcher.is_error():  # compile() validated it: a failure here is the matcher's own
            raise ValueError(f"response_format: {matcher.get_error()}")
        return JsonConstraint(matcher, self.tokenizer.vocab_size, self.vocab_size)


def compile_response_format(response_format: Any, tokenizer, vocab_size: int) -> Grammar | None:
    """The grammar of `response_format` (see response_format_schema) for a pixtral_fast Tokenizer and
    a model of `vocab_size` logits; None for plain text. ValueError for a format or schema that
    cannot be compiled, naming the unsupported keyword as llguidance reports it."""
    schema = response_format_schema(response_format)
    if schema is None:
        return None
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ValueError(f"response_format: the schema is {len(text)} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}")
    compiled = load_llguidance().LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    return checked_grammar(compiled, tokenizer, vocab_size, "response_format: the schema")


def checked_grammar(compiled: Any, tokenizer, vocab_size: int, what: str) -> Grammar:
    """A grammar llguidance built (grammar_from_json_schema, grammar_from_lark) checked against the
    tokenizer's vocabulary; ValueError starting with `what` naming what cannot be compiled."""
    with _BUILD_LOCK:
        ll_tokenizer = _llg_tokenizer(tokenizer.mistral)
    if ll_tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{what}: the tokenizer has {ll_tokenizer.vocab_size} tokens, more than the "
                         f"model's {vocab_size} logits")
    error = load_llguidance().LLMatcher.validate_grammar(compiled, ll_tokenizer)
    if error:
        raise ValueError(f"{what} cannot be compiled: {error}")
    return Grammar(compiled, ll_tokenizer, vocab_size)


class JsonConstraint:
    """A request's llguidance matcher as a TokenConstraint: allowed() fills the bitmask of the
    matcher's state (llguidance caches it per state, so a retried step costs nothing more);
    advance() consumes the sampled token. The end of sequence is allowed only where the document
    is complete; a matcher in an error state refuses rather than let the error pass for an end."""

    def __init__(self, matcher, tokenizer_vocab: int, vocab_size: int):
        self.matcher = matcher
        self.words = np.zeros(bitmask_words(vocab_size), dtype=np.int32)  # tokens past the tokenizer's: never
        self._row = torch.zeros(1, bitmask_words(tokenizer_vocab), dtype=torch.int32)

    def allowed(self) -> np.ndarray:
        self._check()
        load_llguidance().torch.fill_next_token_bitmask(self.matcher, self._row, 0)
        words = self.words.copy()
        words[: self._row.shape[1]] = self._row[0].numpy()
        return words

    def advance(self, token: int) -> None:
        self._check()
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} does not continue the document: {self.matcher.get_error() or 'refused'}")

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"the grammar matcher failed: {self.matcher.get_error()}")

