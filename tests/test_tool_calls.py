"""Function calling on the offline engine: with the random-weight tiny model at temperature 1, every
`tool_choice="required"` answer is a [TOOL_CALLS] array whose arguments validate against the
called tool's parameters (the grammar constrains every token); a named choice calls that tool;
parallel_tool_calls=false makes one call; "none" and free text can never emit [TOOL_CALLS]; the
tools, an assistant's calls and a tool's result go into the prompt (multi-turn); what cannot be
honoured is refused with a ValueError whose .param names the field."""
import json

import jsonschema
import numpy as np
import openai
import pydantic
import pytest

from pixtral_fast.runtime.tool_calls import call_ids, compile_tools
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer, tekken_file
from tests.support.engines import assert_clean, model, new_engine, tiny_dir, tok  # noqa: F401 - fixtures

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                        "unit": {"enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object",
                                      "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                                     "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                                      "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CALLS_TOKEN, AVAILABLE_TOOLS, TOOL_RESULTS = 9, 5, 7  # Tekken v3's special ids


@pytest.fixture(scope="module")
def engine(model, tok):
    with new_engine(model, tok, num_blocks=256) as engine:
        yield engine


def questions(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {i}: what now?"}] for i in range(n)]


def assert_valid_calls(completion, names=tuple(PARAMETERS)):
    assert completion.finish_reason == "tool_calls", (completion.finish_reason, completion.tokens)
    assert completion.tokens[0] == CALLS_TOKEN and completion.text == ""
    assert completion.tool_calls
    for call in completion.tool_calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
        assert len(call.id) == 9 and call.id.isalnum()


def test_required_always_calls_a_tool_with_valid_arguments(engine):
    out = engine.generate(questions(4), max_new_tokens=60, temperature=1.0, seed=1, tools=TOOLS,
                          tool_choice="required", parallel_tool_calls=False)
    for completion in out:
        assert_valid_calls(completion)


def test_a_named_choice_calls_that_tool_once_without_parallel_calls(engine):
    out = engine.generate(questions(3), max_new_tokens=40, temperature=1.0, seed=5, tools=TOOLS,
                          tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
    for completion in out:
        assert_valid_calls(completion, names=("add",))
        assert len(completion.tool_calls) == 1


def test_call_ids_follow_the_seed():
    assert call_ids(2, seed=9) == call_ids(2, seed=9) != call_ids(2, seed=10)
    assert all(len(i) == 9 and i.isalnum() for i in call_ids(3, seed=None))


def allowed(constraint, token: int) -> bool:
    words = constraint.allowed()
    return bool((int(words[token // 32]) >> (token % 32)) & 1)


def test_none_and_free_text_can_never_emit_the_calls_token(engine):
    tokenizer = engine.tokenizer
    word = tokenizer.tekken.encode("Hello", bos=False, eos=False)[0]
    none = engine.tools_grammar(TOOLS, "none").constraint()
    auto = engine.tools_grammar(TOOLS, "auto").constraint()
    assert not allowed(none, CALLS_TOKEN) and allowed(none, word) and allowed(none, tokenizer.eos_id)
    assert allowed(auto, CALLS_TOKEN) and allowed(auto, word)
    auto.advance(word)  # once the answer is text, a call cannot start in its middle
    assert not allowed(auto, CALLS_TOKEN) and allowed(auto, word)
    required = engine.tools_grammar(TOOLS, "required").constraint()
    assert np.count_nonzero(required.allowed()) == 1 and allowed(required, CALLS_TOKEN)


def test_parallel_calls_may_follow_a_call_unless_turned_off(engine):
    tokenizer = engine.tokenizer
    one_call = tokenizer.tekken.encode('[{"name": "add", "arguments": {"a": 1, "b": 2}}', bos=False, eos=False)
    comma, close = (tokenizer.tekken.encode(text, bos=False, eos=False)[0] for text in (", ", "]"))
    for parallel, more in ((True, True), (None, True), (False, False)):
        constraint = engine.tools_grammar(TOOLS, "required", parallel).constraint()
        for token in [CALLS_TOKEN, *one_call]:
            constraint.advance(token)
        assert allowed(constraint, comma) is more and allowed(constraint, close)


def test_parameters_with_local_references_compile(engine):
    class Point(pydantic.BaseModel):
        x: int

    class Path(pydantic.BaseModel):
        start: Point
        stops: list[Point]

    tool = openai.pydantic_function_tool(Path, name="path")  # its parameters refer to "#/$defs/Point"
    for tools in ([tool], [tool, TOOLS[1]]):
        constraint = engine.tools_grammar(tools, "required").constraint()
        text = '[{"name": "path", "arguments": {"start": {"x": 1}, "stops": [{"x": 2}]}}]'
        for token in [CALLS_TOKEN, *engine.tokenizer.tekken.encode(text, bos=False, eos=False)]:
            constraint.advance(token)
        assert allowed(constraint, engine.tokenizer.eos_id)


def test_none_answers_in_text(engine):
    out = engine.generate(questions(2), max_new_tokens=8, temperature=1.0, seed=3, tools=TOOLS, tool_choice="none")
    for completion in out:
        assert completion.finish_reason in ("stop", "length") and not completion.tool_calls
        assert all(t >= 1000 or t == engine.tokenizer.eos_id for t in completion.tokens)  # no special token


def test_the_tools_and_a_tool_result_go_into_the_prompt_and_the_answer_runs(engine):
    call = engine.generate(questions(1)[0], max_new_tokens=60, temperature=1.0, seed=4, tools=TOOLS,
                           tool_choice="required", parallel_tool_calls=False).tool_calls[0]
    conversation = questions(1)[0] + [
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    tokens = engine.tokenizer.encode(conversation, tools=TOOLS).tokens
    assert AVAILABLE_TOOLS in tokens and CALLS_TOKEN in tokens and TOOL_RESULTS in tokens
    assert "21 degrees" in engine.tokenizer.tekken.decode(tokens, special_token_policy="keep")
    answer = engine.generate(conversation, max_new_tokens=6, temperature=1.0, seed=1, tools=TOOLS)
    assert answer.prompt_tokens == len(tokens) and answer.finish_reason in ("stop", "length", "tool_calls")


ADD_ONLY = [TOOLS[1]]


@pytest.mark.parametrize("tools, choice, parallel, param, message", [
    (ADD_ONLY, {"type": "function", "function": {"name": "sub"}}, None, "tool_choice", "'sub', which is not among"),
    (ADD_ONLY, "always", None, "tool_choice", "tool_choice must be"),
    (None, "required", None, "tool_choice", "needs tools"),
    ([{"type": "function", "function": {"name": "u", "parameters": {"type": "array", "uniqueItems": True}}}],
     "auto", None, "tools[0].function.parameters", "uniqueItems"),
    ({"type": "function"}, "auto", None, "tools", "non-empty list"),
    ([], "required", None, "tool_choice", "needs tools"),
    ([{"type": "retrieval"}], "auto", None, "tools[0]", "type 'function'"),
    ([{"type": "function"}], "auto", None, "tools[0].function", "must be an object"),
    ([{"type": "function", "function": {"name": "has space"}}], "auto", None, "tools[0].function.name", "letters"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "auto", None,
     "tools[0].function.parameters", "JSON Schema object"),
    (ADD_ONLY + ADD_ONLY, "auto", None, "tools", "more than once"),
    (ADD_ONLY, "auto", "yes", "parallel_tool_calls", "true or false"),
])
def test_bad_tools_are_refused_naming_the_field(engine, tools, choice, parallel, param, message):
    with pytest.raises(ValueError, match=message) as refused:
        engine.generate(questions(1)[0], max_new_tokens=2, tools=tools, tool_choice=choice,
                        parallel_tool_calls=parallel)
    assert refused.value.param == param
    assert_clean(engine)


def test_tools_and_response_format_together_are_refused(engine):
    with pytest.raises(ValueError, match="cannot be combined"):
        engine.generate(questions(1)[0], max_new_tokens=2, tools=TOOLS, response_format={"type": "json_object"})


@pytest.mark.parametrize("message, where", [
    ({"role": "tool", "content": "x"}, r"messages\[1\]: a tool message needs tool_call_id"),
    ({"role": "tool", "tool_call_id": "abcdefghi"}, r"messages\[1\]: a tool message needs content"),
    ({"role": "assistant", "tool_calls": [{"id": "abcdefghi", "type": "function",
                                           "function": {"name": "add", "arguments": "{not json"}}]},
     r"messages\[1\].tool_calls\[0\].function.arguments: not valid JSON"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "add"}}]},
     r"messages\[1\].tool_calls\[0\].id: must be"),
    ({"role": "assistant", "tool_calls": {"id": "x"}}, r"messages\[1\].tool_calls: must be a list"),
])
def test_bad_tool_messages_name_the_field(engine, message, where):
    with pytest.raises(ValueError, match=where):
        engine.tokenizer.encode(questions(1)[0] + [message], tools=TOOLS)


def test_tokenizers_with_another_tool_layout_are_refused(tmp_path):
    tekken = json.loads(tekken_file().read_text())
    tekken["config"]["version"] = "v7"
    (tmp_path / "tekken.json").write_text(json.dumps(tekken))
    with pytest.raises(ValueError, match="Tekken v7, whose tool-call layout is not supported") as refused:
        compile_tools(TOOLS, "auto", None, Tokenizer.from_file(tmp_path / "tekken.json"), 131072)
    assert refused.value.param == "tools"
    spm = make_tiny(tmp_path / "large", seed=0, variant="pixtral-large")
    with pytest.raises(ValueError, match="SentencePiece"):
        compile_tools(TOOLS, "auto", None, Tokenizer.for_checkpoint(spm), 131072)
