"""The server's bounds: no request stalls the event loop (parsing, tokenizing, building a large
answer all run off it, after cheap size checks), nothing a client asks for is silently ignored or
clamped, and client errors are 4xx with short messages. In-process, over the ASGI app."""
import asyncio
import json
import logging
import threading
import time

import httpx
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.async_engine import AsyncEngine
from pixtral_fast.serve import protocol as wire
from pixtral_fast.serve.app import ServerSettings, build_app
from pixtral_fast.serve.protocol import APIError
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer
from tests.support.serve_server import user_message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return model, Tokenizer.for_checkpoint(folder)


def serve(tiny, scenario, **settings):
    """Runs `scenario(client, app)` against a fresh app over the tiny model."""
    async def run():
        ae = AsyncEngine(pf.Engine.from_model(*tiny, num_blocks=64, progress=False)).start()
        app = build_app(ae, ServerSettings(model_name="m", **settings))
        app.state.server.http = httpx.AsyncClient()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                return await scenario(client, app)
        finally:
            await ae.aclose()
    return asyncio.run(run())


async def worst_loop_lag(work) -> tuple[object, float]:
    """(work's result, the longest the event loop went without running a 10 ms ticker)."""
    worst, running = 0.0, True

    async def ticker():
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            worst, last = max(worst, now - last - 0.01), now
    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.02)
    try:
        return await work, worst
    finally:
        running = False
        await tick


def post(client, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/chat/completions", content=data, headers={"content-type": "application/json"}, **kw)


def error_of(response: httpx.Response) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    return response.json()["error"]


def hello(**fields) -> dict:
    return {"messages": user_message("Hello?"), "max_tokens": 2, "temperature": 0, **fields}


# -- 1. the body's JSON: no Python call per integer, a long integer found cheaply ------------------

ZEROS = b'{"x":[' + b",".join([b"0"] * 1_000_000) + b"]}"


def best_time(fn, tries: int = 3) -> float:
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        try:
            fn()
        except APIError:
            pass
        times.append(time.perf_counter() - started)
    return min(times)


def test_a_body_of_many_integers_parses_at_json_speed():
    plain = best_time(lambda: json.loads(ZEROS))
    assert best_time(lambda: wire.parse_json(ZEROS)) < 2.5 * plain + 0.05


def test_a_long_integer_at_the_end_of_a_large_body_is_refused_quickly():
    body = ZEROS[:-2] + b",123456789012345678901234567890]}"
    started = time.perf_counter()
    with pytest.raises(APIError) as refused:
        wire.parse_json(body)
    assert time.perf_counter() - started < 1.0
    assert refused.value.status == 400 and "30 digits" in refused.value.message


def test_long_digit_runs_of_floats_in_a_large_body_are_no_integers():
    padding = b'"' + b"a" * (wire.LOCATE_LONG_INT_BYTES + 1) + b'"'
    for number in (b"1.1234567890123456789012345", b"1e-1234567890123456789012", b"12345678901234567890123.5"):
        assert wire.parse_json(b'{"pad": ' + padding + b', "x": ' + number + b"}")["x"] == json.loads(number)


def test_a_long_integer_in_a_small_body_is_named_and_digits_in_strings_are_text():
    with pytest.raises(APIError) as refused:
        wire.parse_json(b'{"messages": [], "seed": 1234567890123456789012345}')
    assert refused.value.param == "seed"
    assert wire.parse_json(b'{"text": "1234567890123456789012345", "n": 1}')["n"] == 1


def test_parsing_a_large_body_leaves_the_event_loop_free(tiny):
    """json.loads holds the GIL (C code) wherever it runs: the loop may wait that long, no longer."""
    body = json.dumps(hello(junk=[[0] * 100] * 20_000)).encode()   # ~4 MB of integers

    async def scenario(client, _app):
        lags = []
        for _ in range(3):  # another process on the cores can only add to a lag: the best of three
            response, lag = await worst_loop_lag(post(client, body))
            assert response.status_code == 200, response.text[:300]
            lags.append(lag)
        return min(lags)
    assert serve(tiny, scenario) < 1.5 * best_time(lambda: json.loads(body)) + 0.05


# -- 2. messages and parts counted before any per-part work ---------------------------------------

def test_messages_and_parts_are_bounded(tiny):
    many_messages = {**hello(), "messages": [{"role": "user", "content": "a"}] * (wire.MAX_MESSAGES + 1)}
    many_parts = {**hello(), "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]
                                           * (wire.MAX_PARTS + 1)}]}
    many_images = {**hello(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "not a url"}}] * 9}]}

    async def scenario(client, _app):
        return [error_of(await post(client, b)) for b in (many_messages, many_parts, many_images)]
    messages, parts, images = serve(tiny, scenario)
    assert messages["param"] == "messages" and f"at most {wire.MAX_MESSAGES}" in messages["message"]
    assert parts["param"] == "messages" and f"at most {wire.MAX_PARTS}" in parts["message"]
    assert "9 images" in images["message"] and "at most 8" in images["message"]


# -- 3. checks before tokenizing -------------------------------------------------------------------

def test_a_prompt_surely_over_the_bound_is_refused_before_tokenizing(tiny, monkeypatch):
    encoded = []
    monkeypatch.setattr(Tokenizer, "encode", lambda self, *a, **k: encoded.append(1) or 1 / 0)

    async def scenario(client, _app):
        long_text = {**hello(), "messages": user_message("a b c " * 20_000)}
        bad_top_k = {**hello(), "top_k": 10**9}
        return [error_of(await post(client, b)) for b in (long_text, bad_top_k)]
    long_text, bad_top_k = serve(tiny, scenario, max_prompt_tokens=100)
    assert "at least" in long_text["message"] and long_text["param"] == "messages"
    assert bad_top_k["param"] == "top_k"
    assert encoded == []


# -- 4. a large answer is built off the event loop -------------------------------------------------

def test_a_plain_answer_is_built_off_the_event_loop(tiny, monkeypatch):
    threads = []
    build = wire.completion_body

    def recording(*a, **k):
        threads.append(threading.current_thread())
        return build(*a, **k)
    monkeypatch.setattr(wire, "completion_body", recording)

    async def scenario(client, _app):
        response = await post(client, hello(n=4, logprobs=True, top_logprobs=20, max_tokens=4))
        assert response.status_code == 200, response.text[:300]
        return response.json()
    answer = serve(tiny, scenario)
    assert len(answer["choices"]) == 4 and len(answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    assert threads and threading.main_thread() not in threads


# -- 5. a client that leaves, or trickles its body -------------------------------------------------

def asgi_post(app, chunks: list[bytes], then_wait: float = 0.0):
    """Sends the body in `chunks`, then (then_wait) waits or disconnects; the answer's messages."""
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    pending = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    sent = []

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(then_wait)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
    return app(scope, receive, send), sent


def test_a_client_leaving_mid_body_is_no_internal_error(tiny, caplog):
    async def scenario(_client, app):
        call, sent = asgi_post(app, [b'{"messages": '])
        await call
        metrics = app.state.server.metrics
        metrics.errors.labels("500")  # the series exists (at 0) before it is read
        return sent, metrics.registry.get_sample_value("pixtral_fast_http_errors_total", {"status": "500"})
    with caplog.at_level(logging.INFO, logger="pixtral_fast.serve"):
        sent, internal_errors = serve(tiny, scenario)
    assert internal_errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert all(m.get("status", 0) < 500 for m in sent)


def test_a_body_that_does_not_arrive_in_time_is_a_408(tiny):
    async def scenario(_client, app):
        call, sent = asgi_post(app, [b'{"messages": '], then_wait=30)
        started = time.perf_counter()
        await asyncio.wait_for(call, 10)
        return sent, time.perf_counter() - started
    sent, took = serve(tiny, scenario, body_read_timeout=0.3)
    assert sent[0]["status"] == 408 and took < 5
    assert "did not arrive within 0.3 s" in json.loads(sent[1]["body"])["error"]["message"]


# -- 6. echoed values are cut ----------------------------------------------------------------------

def test_error_messages_show_client_values_cut(tiny):
    big = "r" * 1_000_000
    bodies = [{**hello(), "messages": [{"role": big, "content": "x"}]},
              {**hello(), "messages": [{"role": "user", "content": [{"type": big}]}]},
              {**hello(), "messages": [{"role": "user", "content": [{"type": [0] * 300_000}]}]},
              {**hello(), "model": big}]

    async def scenario(client, _app):
        return [error_of(await post(client, b)) for b in bodies]
    for error in serve(tiny, scenario):
        assert len(error["message"]) < 400, error["message"][:200]


# -- 7. no silent clamping -------------------------------------------------------------------------

def test_max_tokens_beyond_the_context_is_a_400_naming_the_room_left(tiny):
    async def scenario(client, app):
        limit = app.state.server.engine.engine.max_model_len
        too_many = error_of(await post(client, hello(max_tokens=limit)))
        differ = error_of(await post(client, hello(max_tokens=2, max_completion_tokens=3)))
        same = await post(client, hello(max_tokens=2, max_completion_tokens=2))
        return limit, too_many, differ, same
    limit, too_many, differ, same = serve(tiny, scenario)
    assert too_many["param"] == "max_tokens" and f"context holds {limit} tokens" in too_many["message"]
    assert "leaves" in too_many["message"]
    assert differ["param"] == "max_completion_tokens"
    assert same.status_code == 200


# -- 8. what asks for behaviour we lack is refused by name; the harmless is accepted ---------------

REFUSED = {"min_tokens": 5, "repetition_penalty": 1.2, "ignore_eos": True, "stop_token_ids": [3], "best_of": 2,
           "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
           "prediction": {"type": "content", "content": "x"}, "web_search_options": {}}
ACCEPTED = {"user": "u", "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True, "min_tokens": 0,
            "repetition_penalty": 1.0, "ignore_eos": False, "best_of": 1, "modalities": ["text"]}


def test_parameters_we_do_not_implement_are_refused_by_name(tiny):
    async def scenario(client, _app):
        refused = {name: error_of(await post(client, hello(**{name: value}))) for name, value in REFUSED.items()}
        return refused, await post(client, hello(**ACCEPTED))
    refused, accepted = serve(tiny, scenario)
    for name, error in refused.items():
        assert error["param"] == name and name in error["message"]
    assert accepted.status_code == 200, accepted.text


def test_a_compressed_body_is_a_415_and_a_trailing_slash_a_json_404(tiny):
    import gzip

    async def scenario(client, _app):
        body = json.dumps(hello()).encode()
        packed = await client.post("/v1/chat/completions", content=gzip.compress(body),
                                   headers={"content-type": "application/json", "content-encoding": "gzip"})
        slash = await client.post("/v1/chat/completions/", json=hello())
        plain = await client.post("/v1/chat/completions", content=body,
                                  headers={"content-type": "application/json", "content-encoding": "identity"})
        return packed, slash, plain
    packed, slash, plain = serve(tiny, scenario)
    assert packed.status_code == 415 and "Content-Encoding 'gzip'" in packed.json()["error"]["message"]
    assert slash.status_code == 404 and slash.json()["error"]["code"] == "not_found"
    assert plain.status_code == 200
