"""response_format on the offline engine: the random-weight tiny model, sampling at temperature 1,
always produces a document that parses and validates against the schema (the grammar constrains
every token), ending with finish_reason "stop"; streamed text equals generated text; formats and
schemas that cannot be honoured are refused with a ValueError naming what is wrong."""
import json

import jsonschema
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded, Tokenizer

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                 "required": ["name", "age"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                                        "items": {"type": "string", "maxLength": 5}}},
              "required": ["tags"], "additionalProperties": False},
    "enum_and_bool": {"type": "object", "properties": {"status": {"enum": ["on", "off", "broken"]},
                                                       "ok": {"type": "boolean"}},
                      "required": ["status", "ok"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": -9, "maximum": 9},
                                                              {"type": "string", "maxLength": 4}, {"type": "null"}]}},
               "required": ["v"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                  "b": {"type": "boolean"}},
                 "required": ["a"], "additionalProperties": False},
}


def json_schema(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    with pf.Engine.from_model(model, Tokenizer.for_checkpoint(folder), num_blocks=256, progress=False) as engine:
        yield engine


def prompt(i: int) -> Encoded:
    return Encoded(tokens=[1] + [1000 + 17 * i + t for t in range(7)], images=[])


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sample_validates(engine, name):
    out = engine.generate([prompt(i) for i in range(4)], max_new_tokens=200, temperature=1.0, seed=11,
                          response_format=json_schema(name))
    for completion in out:
        assert completion.finish_reason == "stop", (completion.finish_reason, completion.text)
        document = json.loads(completion.text)
        jsonschema.validate(document, SCHEMAS[name])
        if name in ("enum_and_bool", "pattern", "optional"):  # no free text: the document is compact JSON
            assert completion.text == json.dumps(document, separators=(",", ":"))


def test_json_object_gives_an_object(engine):
    out = engine.generate(prompt(0), max_new_tokens=200, temperature=0.0, response_format={"type": "json_object"})
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.startswith("{")


def test_streamed_text_equals_generated_text(engine):
    fmt = json_schema("nested")
    whole = engine.generate(prompt(3), max_new_tokens=200, temperature=1.0, seed=4, response_format=fmt)
    streamed = "".join(engine.stream(prompt(3), max_new_tokens=200, temperature=1.0, seed=4, response_format=fmt))
    assert streamed == whole.text and json.loads(streamed)


def test_text_format_is_unconstrained(engine):
    free = engine.generate(prompt(1), max_new_tokens=8, seed=2, temperature=1.0)
    text = engine.generate(prompt(1), max_new_tokens=8, seed=2, temperature=1.0, response_format={"type": "text"})
    assert text.tokens == free.tokens


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}},
     "uniqueItems"),
    ({"type": "yaml"}, "response_format.type must be"),
    ("json", "must be an object"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name must be a string"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}, "unknown field"),
    ({"type": "json_object", "schema": {}}, "unknown field"),
])
def test_bad_formats_are_refused(engine, fmt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt(0), max_new_tokens=4, response_format=fmt)
    assert engine.usage().running == engine.usage().waiting == 0


def test_a_sentencepiece_tokenizer_is_refused(tmp_path):
    folder = make_tiny(tmp_path / "large", seed=0, variant="pixtral-large")
    with pf.Engine.from_pretrained(folder, device="cpu", dtype=torch.float32, backend="reference", num_blocks=16,
                                   progress=False) as engine:
        with pytest.raises(ValueError, match="needs a Tekken tokenizer"):
            engine.generate(Encoded(tokens=[1, 5, 6], images=[]), max_new_tokens=2,
                            response_format={"type": "json_object"})
