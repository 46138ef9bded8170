"""tools on the server, driven by the official openai client: with the random tiny model at
temperature 1, `tool_choice="required"` answers are tool calls (content null, finish_reason
"tool_calls") whose arguments validate against the called tool's parameters; a streamed answer's
`delta.tool_calls`, accumulated as OpenAI documents, equal the plain answer's calls; "none" answers
in text; a tool's result goes back into the prompt; bad tools and messages are 400s naming the
param."""
import json

import jsonschema
import openai
import pytest

from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer
from tests.support.serve_server import CPU_ARGS, ServerProcess
from tests.test_tool_calls import PARAMETERS, TOOLS

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    proc = ServerProcess(["--model", str(folder), *CPU_ARGS, "--num-gpu-blocks-override", "256",
                          "--max-model-len", "1024", "--served-model-name", "x"],
                         tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def ask(client, **kwargs):
    args = dict(model="x", messages=MESSAGES, temperature=1.0, max_tokens=60, tools=TOOLS) | kwargs
    return client.chat.completions.create(**args)


def calls_of(message) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]


def assert_valid(choice, names=tuple(PARAMETERS)):
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.function.name in names and len(call.id) == 9
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_required_choices_are_calls_with_valid_arguments(client):
    out = ask(client, seed=7, n=3, tool_choice="required", parallel_tool_calls=False)
    assert len(out.choices) == 3
    for choice in out.choices:
        assert_valid(choice)
        assert len(choice.message.tool_calls) == 1


def streamed_calls(chunks) -> tuple[list[tuple[str, str, str]], str | None]:
    """The calls as a client accumulates them: by index, id and name once, arguments appended."""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, ["", "", ""])
                call[0] = delta.id or call[0]
                if delta.function is not None:
                    call[1] = delta.function.name or call[1]
                    call[2] += delta.function.arguments or ""
    return [tuple(calls[i]) for i in sorted(calls)], finish


def test_streamed_calls_equal_plain_calls(client):
    kwargs = dict(seed=3, tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
    plain = ask(client, **kwargs).choices[0]
    assert_valid(plain, names=("add",))
    calls, finish = streamed_calls(ask(client, stream=True, **kwargs))
    assert finish == "tool_calls" and calls == calls_of(plain.message)
    # the client's own accumulator (its stream helper) builds the same message
    args = dict(model="x", messages=MESSAGES, temperature=1.0, max_tokens=60, tools=TOOLS) | kwargs
    with client.chat.completions.stream(**args) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and calls_of(final.message) == calls


def test_none_answers_in_text(client):
    out = ask(client, seed=1, max_tokens=6, tool_choice="none")
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert isinstance(choice.message.content, str)


def test_auto_text_streams_as_content(client):
    plain = ask(client, seed=4, max_tokens=5).choices[0]  # tool_choice "auto": the random model writes text
    chunks = list(ask(client, seed=4, max_tokens=5, stream=True))
    assert plain.finish_reason == "length" and plain.message.content and not plain.message.tool_calls
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.message.content
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


def test_a_tool_result_goes_back_to_the_model(client):
    first = ask(client, seed=5, tool_choice="required", parallel_tool_calls=False).choices[0].message
    conversation = MESSAGES + [
        {"role": "assistant", "content": None,
         "tool_calls": [c.model_dump(exclude_none=True) for c in first.tool_calls]},
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "5"}]
    out = ask(client, messages=conversation, seed=2, max_tokens=4)
    tokens = Tokenizer.default().encode(conversation, tools=TOOLS).tokens
    assert out.usage.prompt_tokens == len(tokens) and 7 in tokens  # [TOOL_RESULTS]


BAD = {
    "unknown named function": (dict(tool_choice={"type": "function", "function": {"name": "sub"}}), "tool_choice"),
    "required without tools": (dict(tools=None, tool_choice="required"), "tool_choice"),
    "unsupported keyword": (dict(tools=[{"type": "function", "function": {
        "name": "u", "parameters": {"type": "object", "properties": {"v": {"type": "array", "uniqueItems": True}}}}}]),
        "tools[0].function.parameters"),
    "malformed tool": (dict(tools=[{"type": "function", "function": {"description": "no name"}}]),
                       "tools[0].function.name"),
    "tool message without id": (dict(messages=MESSAGES + [{"role": "tool", "content": "5"}]),
                                "messages[1].tool_call_id"),
    "with response_format": (dict(response_format={"type": "json_object"}), "response_format"),
    "parallel not a bool": (dict(parallel_tool_calls="yes"), "parallel_tool_calls"),
}


@pytest.mark.parametrize("kwargs, param", BAD.values(), ids=BAD.keys())
def test_bad_input_is_a_400_naming_the_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, **kwargs)
    assert refused.value.status_code == 400 and refused.value.param == param, refused.value.body
