"""Hostile but well-formed-looking requests against the real server (one subprocess for the
module, on a tiny random checkpoint): bounded stop strings that never stall /health, null as
the default, integers of thousands of digits, and usage over several streamed choices. Raw
JSON goes through httpx where the openai client cannot send the case."""
import json
import threading
import time

import httpx
import openai
import pytest

from pixtral_fast.runtime.output import MAX_STOP_CHARS
from pixtral_fast.tiny import make_tiny
from tests.support.serve_server import CPU_ARGS, ServerProcess, user_message

MODEL = "tiny-hostile"
MESSAGES = user_message("Say something, please.")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny_dir = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    args = ["--model", str(tiny_dir), *CPU_ARGS, "--served-model-name", MODEL, "--num-gpu-blocks-override", "256",
            "--max-model-len", "256", "--disable-uvicorn-access-log"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def post(http: httpx.Client, server, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(server.url + "/v1/chat/completions", content=content,
                     headers={"Content-Type": "application/json"}, timeout=120)


def local_port(response: httpx.Response) -> int:
    """The client's end of the connection that carried this response."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


# -- stop strings: bounded, and never a stall -----------------------------------------------------

@pytest.mark.parametrize("length", [MAX_STOP_CHARS + 1, 200_000])
def test_a_stop_string_over_the_bound_is_a_400_naming_stop_and_the_bound(server, length):
    with httpx.Client() as http:
        r = post(http, server, {"messages": MESSAGES, "max_tokens": 2, "stop": ["ok", "x" * length]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "stop" and str(MAX_STOP_CHARS) in error["message"] and str(length) in error["message"]


def test_max_length_stops_over_a_long_generation_leave_health_fast(server):
    """16 stops of the maximum length that keep nearly matching (their prefixes are the
    commonest characters) over two streamed choices: /health answers within a second all along."""
    stops = [c * (MAX_STOP_CHARS - 1) + "\u2603" for c in " etaoinsrhldcumf"]
    body = {"messages": MESSAGES, "max_tokens": 32, "n": 2, "temperature": 1.0, "seed": 3, "stop": stops,
            "stream": True}
    answer: dict = {}

    def generate():
        with httpx.Client() as http:
            answer["response"] = post(http, server, body)

    worker = threading.Thread(target=generate)
    worker.start()
    latencies = []
    with httpx.Client() as http:
        while worker.is_alive():
            started = time.perf_counter()
            assert http.get(server.url + "/health", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    worker.join()
    response = answer["response"]
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


# -- null is the default -------------------------------------------------------------------------

NULLABLE = ["temperature", "top_p", "n", "top_k", "max_tokens", "seed", "logprobs", "top_logprobs", "stream",
            "stream_options", "stop", "presence_penalty", "frequency_penalty", "user", "model", "response_format",
            "tools", "tool_choice", "logit_bias"]


def test_null_for_an_optional_field_means_its_default(server):
    base = {"messages": MESSAGES, "max_completion_tokens": 6}
    with httpx.Client() as http:
        seeded = post(http, server, {**base, "seed": 11})
        nulls = post(http, server, {**base, "seed": 11, **{k: None for k in NULLABLE if k != "seed"}})
        each = {k: post(http, server, {**base, "max_completion_tokens": 1, k: None}) for k in NULLABLE}
    assert seeded.status_code == 200 and nulls.status_code == 200, nulls.text
    assert nulls.json()["choices"] == seeded.json()["choices"]  # temperature 1, top_p 1, n 1, no stop
    assert {k: r.status_code for k, r in each.items()} == {k: 200 for k in NULLABLE}, \
        {k: r.text for k, r in each.items() if r.status_code != 200}
    with httpx.Client() as http:
        missing = post(http, server, {"messages": None, "max_tokens": 2})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"


# -- integers of thousands of digits -------------------------------------------------------------

@pytest.mark.parametrize("field", ["seed", "max_tokens", "n", "top_k", "top_logprobs", "max_completion_tokens"])
def test_an_int_of_5000_digits_is_a_400_naming_it_and_the_connection_survives(server, field):
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2, "logprobs": True, field: 0})
    huge = body.replace(f'"{field}": 0', f'"{field}": {"9" * 5000}').encode()
    with httpx.Client() as http:
        bad = post(http, server, huge)
        bad_port = local_port(bad)
        good = post(http, server, {"messages": MESSAGES, "max_tokens": 2})
        assert local_port(good) == bad_port  # the same keep-alive connection carried both
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["param"] == field and "5000 digits" in error["message"] and "20" in error["message"]
    assert good.status_code == 200


def test_an_int_of_5000_digits_inside_a_message_is_a_400_naming_its_place(server):
    huge = ('{"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": -'
            + "7" * 5000 + '}]}]}').encode()
    with httpx.Client() as http:
        r = post(http, server, huge)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content[0].x"


@pytest.mark.parametrize("seed, status", [(2**64, 400), (-2**63 - 1, 400), (2**64 - 1, 200), (-2**63, 200)])
def test_a_seed_beyond_64_bits_is_a_400_naming_seed(server, seed, status):
    with httpx.Client() as http:
        r = post(http, server, {"messages": MESSAGES, "max_tokens": 2, "seed": seed})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "seed" and (str(2**64 - 1) in r.text or str(-2**63) in r.text)


# -- usage over several choices ------------------------------------------------------------------

def streamed_choices(chunks) -> tuple[dict, object]:
    """Per choice index: its text, logprob entries and finish reason; and the usage chunk's usage."""
    choices, usage = {}, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for c in chunk.choices:
            entry = choices.setdefault(c.index, {"text": "", "tokens": 0, "finish": None})
            entry["text"] += c.delta.content or ""
            entry["tokens"] += len(c.logprobs.content) if c.logprobs and c.logprobs.content else 0
            entry["finish"] = c.finish_reason or entry["finish"]
    return choices, usage


def test_streamed_usage_counts_every_choice_as_the_plain_answer_does(client):
    """Choice 1 ends early on a stop string taken from its own text; choice 0 runs to the
    length limit. Usage: the prompt once, the completion tokens of both choices."""
    request = {"model": MODEL, "messages": MESSAGES, "n": 2, "seed": 5, "temperature": 1.0, "max_tokens": 12,
               "logprobs": True}
    free = client.chat.completions.create(**request)
    texts = [c.message.content for c in free.choices]
    stop = next(texts[1][i:i + 3] for i in range(1, len(texts[1]) // 2) if texts[1][i:i + 3] not in texts[0])
    plain = client.chat.completions.create(**request, stop=stop)
    choices, usage = streamed_choices(client.chat.completions.create(
        **request, stop=stop, stream=True, stream_options={"include_usage": True}))
    assert [choices[i]["finish"] for i in (0, 1)] == ["length", "stop"]
    assert [choices[i]["text"] for i in (0, 1)] == [c.message.content for c in plain.choices]
    per_choice = [choices[i]["tokens"] for i in (0, 1)]
    assert per_choice[0] == 12 and 0 < per_choice[1] < 12
    assert usage.completion_tokens == sum(per_choice) == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens == free.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
