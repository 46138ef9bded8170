"""response_format on the server, driven by the official openai client: json_schema and
json_object answers parse and validate (the random tiny model, temperature 1), streamed or not;
the client's `beta.chat.completions.parse` helper fills a pydantic model; a schema the compiler
refuses is a 400 naming the keyword; the n choices each follow the grammar."""
import json

import httpx
import jsonschema
import openai
import pydantic
import pytest

from pixtral_fast.tiny import make_tiny
from tests.support.serve_server import CPU_ARGS, ServerProcess

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 5},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                    "maxItems": 3}},
          "required": ["city", "rank", "tags"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Give me the city as JSON."}]


class Answer(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    rank: int = pydantic.Field(ge=1, le=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    proc = ServerProcess(["--model", str(folder), *CPU_ARGS, "--num-gpu-blocks-override", "256",
                          "--max-model-len", "1024", "--served-model-name", "x"], tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def json_schema_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_choices_validate(client):
    out = client.chat.completions.create(model="x", messages=MESSAGES, temperature=1.0, seed=7, n=3,
                                         max_tokens=300, response_format=json_schema_format())
    assert len(out.choices) == 3
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_equals_plain(client):
    kwargs = dict(model="x", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=300,
                  response_format=json_schema_format())
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    jsonschema.validate(json.loads(plain), SCHEMA)


def test_json_object(client):
    out = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0.0, max_tokens=60,
                                         response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_the_clients_parse_helper_fills_a_pydantic_model(client):
    parse = client.beta.chat.completions.parse if hasattr(client, "beta") and hasattr(
        client.beta, "chat") else client.chat.completions.parse
    out = parse(model="x", messages=MESSAGES, temperature=1.0, seed=1, max_tokens=300, response_format=Answer)
    answer = out.choices[0].message.parsed
    assert isinstance(answer, Answer) and 1 <= answer.rank <= 5


@pytest.mark.parametrize("fmt, words", [
    (json_schema_format({"type": "array", "uniqueItems": True}), "uniqueItems"),
    ({"type": "yaml"}, "response_format.type must be"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name must be a string"),
])
def test_refused_formats_are_400_naming_what(server, fmt, words):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": MESSAGES, "max_tokens": 5, "response_format": fmt})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == "response_format"
