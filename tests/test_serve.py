"""The OpenAI-compatible server, for real: `python -m pixtral_fast.serve.command` in a subprocess
(one per module) on the tiny checkpoint, driven by the official openai client (sync and async).
Every answer is compared with the offline Engine on the same checkpoint."""
import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
import torch
from PIL import Image

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from tests.support.serve_server import CPU_ARGS, ServerProcess, data_url, metric, picture, png_bytes, user_message

KEY = "sk-test-key"
MODEL = "tiny-pixtral"
MAX_MODEL_LEN = 512
FETCH_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    picture(48, 32, 7).save(folder / "local.png")
    return folder


@pytest.fixture(scope="module")
def server(tiny_dir, media_dir, tmp_path_factory, request):
    args = ["--model", str(tiny_dir), *CPU_ARGS, "--served-model-name", MODEL, "--api-key", KEY,
            "--num-gpu-blocks-override", "512", "--max-model-len", str(MAX_MODEL_LEN), "--max-images-per-prompt", "3",
            "--max-image-pixels", "40000", "--max-request-bytes", "1MiB", "--allowed-local-media-path", str(media_dir),
            "--media-fetch-timeout", str(FETCH_TIMEOUT_S), "--disable-uvicorn-access-log"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log", wait=False)
    request.getfixturevalue("offline")  # loads while the server starts
    proc.wait_ready()
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def offline(tiny_dir):
    return pf.Engine.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, backend="reference", progress=False,
                                     num_blocks=512, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def stream_text(chunks) -> tuple[str, str | None, object]:
    text, finish, usage = [], None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


IMAGES = {"text only": [], "one image": [(70, 40)], "two images of different sizes": [(30, 90), (64, 64)]}


@pytest.mark.parametrize("sizes", IMAGES.values(), ids=IMAGES.keys())
def test_greedy_plain_and_streamed_equal_offline(server, client, offline, sizes):
    urls = [data_url(picture(w, h, seed)) for seed, (w, h) in enumerate(sizes)]
    messages = user_message("Describe what you see, please.", *urls)
    expected = offline.generate(messages, max_new_tokens=16)

    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert plain.object == "chat.completion" and plain.model == MODEL and plain.id.startswith("chatcmpl-")
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == expected.text
    assert plain.choices[0].finish_reason == expected.finish_reason
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (expected.prompt_tokens, len(expected.tokens))
    assert plain.usage.total_tokens == expected.prompt_tokens + len(expected.tokens)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text, finish, usage = stream_text(chunks)
    assert (text, finish) == (expected.text, expected.finish_reason)
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, len(expected.tokens))
    assert chunks[-1].choices == []


def test_32_concurrent_streaming_clients_get_their_offline_answers(server, offline):
    requests = [user_message(f"Request {i}: " + "tell me more " * (i % 5),
                             *([data_url(picture(20 + 8 * i, 30, i))] if i % 4 == 0 else [])) for i in range(32)]
    expected = offline.generate(requests, max_new_tokens=8)

    async def one(client, messages):
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                      stream=True)
        text, finish = [], None
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(text), finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, m) for m in requests))

    got = asyncio.run(run_all())
    assert got == [(e.text, e.finish_reason) for e in expected]


def test_seeded_sampling_equals_offline_and_choice_i_uses_seed_plus_i(client, offline):
    messages = user_message("Tell me a story.", data_url(picture(40, 40, 9)))
    sampling = dict(temperature=0.9, top_p=0.95, seed=1234)
    expected = [offline.generate(messages, max_new_tokens=8, top_k=50, **{**sampling, "seed": 1234 + i}).text
                for i in range(2)]
    assert expected[0] != expected[1]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, n=2,
                                           extra_body={"top_k": 50}, **sampling)
    assert [c.message.content for c in sorted(plain.choices, key=lambda c: c.index)] == expected
    assert plain.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, n=2, stream=True,
                                                 extra_body={"top_k": 50}, **sampling))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == expected


def test_stop_strings_end_the_answer_before_them(client, offline):
    messages = user_message("Say something long.")
    full = offline.generate(messages, max_new_tokens=24)
    stop = full.text[6:10]
    cut = full.text.find(stop)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                           stop=[stop, "never appears \u2603"])
    assert plain.choices[0].message.content == full.text[:cut]
    assert plain.choices[0].finish_reason == "stop"
    assert 0 < plain.usage.completion_tokens < len(full.tokens)
    streamed = stream_text(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                                          temperature=0, stop=stop, stream=True))
    assert streamed[:2] == (full.text[:cut], "stop")


def test_logprobs_match_the_offline_engine(client, offline):
    messages = user_message("Logprobs, please.")
    enc = offline.tokenizer.encode(messages)
    seq = offline.add_request(enc, pf.SamplingParams(max_new_tokens=6, logprobs=3))
    while not seq.finished:
        offline.step()
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == len(seq.logprobs) == 6
    tekken = offline.tokenizer.tekken
    for entry, ref in zip(content, seq.logprobs):
        assert bytes(entry.bytes) == tekken.id_to_byte_piece(ref.token, "keep")
        assert entry.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tekken.id_to_byte_piece(t, "keep") for t, _ in ref.top]
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the best one


def _serve_images(png: bytes):
    """A local http server: /img.png answers the image, anything else 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_local_files_and_http_urls(client, offline, media_dir, tmp_path):
    local = picture(48, 32, 7)
    expected = offline.generate(user_message("What is this?", data_url(local)), max_new_tokens=12).text
    got = client.chat.completions.create(model=MODEL, messages=user_message("What is this?",
                                         (media_dir / "local.png").as_uri()), max_tokens=12, temperature=0)
    assert got.choices[0].message.content == expected
    httpd = _serve_images(png_bytes(local))
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        got = client.chat.completions.create(model=MODEL, messages=user_message("What is this?", base + "/img.png"),
                                             max_tokens=12, temperature=0)
        assert got.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            client.chat.completions.create(model=MODEL, messages=user_message("?", base + "/missing.png"),
                                           max_tokens=2)
    finally:
        httpd.shutdown()
    outside = tmp_path / "outside.png"
    local.save(outside)
    with pytest.raises(openai.BadRequestError, match="outside the allowed local media path"):
        client.chat.completions.create(model=MODEL, messages=user_message("?", outside.as_uri()), max_tokens=2)


def test_models_health_and_metrics_parse(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    families = {f.name: f.type for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    expected = {"pixtral_fast_kv_cache_used_blocks": "gauge", "pixtral_fast_kv_cache_total_blocks": "gauge",
                "pixtral_fast_requests_running": "gauge", "pixtral_fast_requests_waiting": "gauge",
                "pixtral_fast_prompt_tokens": "counter", "pixtral_fast_generation_tokens": "counter",
                "pixtral_fast_time_to_first_token_seconds": "histogram",
                "pixtral_fast_inter_token_latency_seconds": "histogram",
                "pixtral_fast_e2e_request_latency_seconds": "histogram"}
    assert {k: families.get(k) for k in expected} == expected
    assert metric(server.url, "pixtral_fast_kv_cache_total_blocks") == 511
    assert metric(server.url, "pixtral_fast_generation_tokens_total") > 0


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    aborted = metric(server.url, "pixtral_fast_requests_finished_total", {"finish_reason": "abort"}) \
        if "abort" in httpx.get(server.url + "/metrics").text else 0.0
    body = {"model": MODEL, "messages": user_message("Go on forever."), "max_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events = [line for line in (next(lines) for _ in range(8)) if line.startswith("data: ")]
        assert len(events) >= 3
        assert metric(server.url, "pixtral_fast_kv_cache_used_blocks") > 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (metric(server.url, "pixtral_fast_kv_cache_used_blocks") == 0
                and metric(server.url, "pixtral_fast_requests_running") == 0):
            break
        time.sleep(0.1)
    assert metric(server.url, "pixtral_fast_kv_cache_used_blocks") == 0
    assert metric(server.url, "pixtral_fast_requests_finished_total", {"finish_reason": "abort"}) == aborted + 1


def _post(server, body=None, headers=None, content=None):
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    return httpx.post(server.url + "/v1/chat/completions", json=body, content=content, headers=headers, timeout=60)


def _chat(messages, **fields):
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **fields}


BAD_B64 = "data:image/png;base64,!!!notbase64"
NOT_AN_IMAGE = "data:image/png;base64," + __import__("base64").b64encode(b"hello, not a png").decode()
SMALL = data_url(picture(20, 20, 1))
BAD_INPUTS = {
    "bad base64": (400, _chat(user_message("?", BAD_B64)), "messages[0].content[0].image_url.url"),
    "undecodable image": (400, _chat(user_message("?", NOT_AN_IMAGE)), "messages[0].content[0].image_url.url"),
    "too many images": (400, _chat(user_message("?", SMALL, SMALL, SMALL, SMALL)), "messages"),
    "image too large": (400, _chat(user_message("?", data_url(picture(300, 200, 2)))),
                        "messages[0].content[0].image_url.url"),
    "prompt over max_model_len": (400, _chat(user_message("word " * 600)), "messages"),
    "negative temperature": (400, _chat(user_message("?"), temperature=-0.5), "temperature"),
    "negative max_tokens": (400, _chat(user_message("?"), max_tokens=-3), "max_tokens"),
    "top_p above 1": (400, _chat(user_message("?"), top_p=1.5), "top_p"),
    "string for a number": (400, _chat(user_message("?"), temperature="hot"), "temperature"),
    "bool for an int": (400, _chat(user_message("?"), n=True), "n"),
    "top_logprobs without logprobs": (400, _chat(user_message("?"), top_logprobs=2), "top_logprobs"),
    "too many top_logprobs": (400, _chat(user_message("?"), logprobs=True, top_logprobs=21), "top_logprobs"),
    "empty messages": (400, _chat([]), "messages"),
    "no messages": (400, {"model": MODEL}, "messages"),
    "unknown role": (400, _chat([{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    "unknown content part": (400, _chat([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]),
                             "messages[0].content[0]"),
    "non-data, non-http url": (400, _chat(user_message("?", "ftp://example.com/a.png")),
                               "messages[0].content[0].image_url.url"),
    "file url": (400, _chat(user_message("?", "file:///etc/passwd")), "messages[0].content[0].image_url.url"),
    "tool_choice naming no tool": (400, _chat(user_message("?"), tools=[{"type": "function", "function": {"name": "f"}}],
                                              tool_choice={"type": "function", "function": {"name": "g"}}),
                                   "tool_choice"),
    "functions (tools' old form)": (400, _chat(user_message("?"), functions=[{"name": "f"}]), "functions"),
    "top_k over the vocabulary": (400, _chat(user_message("?"), top_k=10**9), "top_k"),
    "a plain path for a url": (400, _chat(user_message("?", "/tmp/x.png")), "messages[0].content[0].image_url.url"),
    "unknown model": (404, _chat(user_message("?"), model="gpt-4o"), "model"),
}


@pytest.mark.parametrize("status, body, param", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_gets_an_openai_error(server, status, body, param):
    response = _post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def _bomb_png() -> bytes:
    """20000 x 20000 one-bit pixels: past PIL's own decompression-bomb limit, yet 50 kB."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


def test_error_messages_say_what_is_wrong(server):
    cases = [
        (_chat(user_message("?", "/tmp/x.png")), ["is not a URL", "data:", "http(s)://", "file://"]),
        (_chat(user_message("?", "data:image/png;base64," + base64.b64encode(_bomb_png()).decode())),
         ["too large", "400000000 pixels", "at most 40000", "--max-image-pixels"]),
        (_chat(user_message("?"), top_k=10**9), ["top_k", "vocabulary size"]),
    ]
    for body, phrases in cases:
        response = _post(server, body)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert all(p in message for p in phrases), message


def _trickle(every: float = 0.2):
    """A local http server that answers 200 and then 10 bytes every `every` seconds, for ever."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"0123456789")
                    self.wfile.flush()
                    time.sleep(every)
            except OSError:  # the server under test hung up: what it should do
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_a_trickling_image_server_is_cut_at_the_fetch_deadline(server):
    httpd = _trickle()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"
        t0 = time.monotonic()
        response = _post(server, _chat(user_message("?", url)))
        elapsed = time.monotonic() - t0
    finally:
        httpd.shutdown()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"within {FETCH_TIMEOUT_S}" in error["message"] and "--media-fetch-timeout" in error["message"]
    assert error["param"] == "messages[0].content[0].image_url.url"
    assert FETCH_TIMEOUT_S - 0.5 < elapsed < FETCH_TIMEOUT_S + 3


def test_raw_http_errors_and_the_server_still_answers(server, client, offline):
    nan = _post(server, content=b'{"model": "%s", "messages": [{"role": "user", "content": "?"}], "top_p": NaN}'
                % MODEL.encode(), headers={"Content-Type": "application/json"})
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "top_p"
    assert _post(server, content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    assert _post(server, content=b"[1, 2]", headers={"Content-Type": "application/json"}).status_code == 400
    deep = _post(server, content=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and "too deeply nested" in deep.json()["error"]["message"]
    deep_inside = b'{"messages": [{"role": "user", "content": %s}]}' % (b"[" * 900 + b"]" * 900)
    assert _post(server, content=deep_inside, headers={"Content-Type": "application/json"}).status_code == 400
    big = _post(server, _chat(user_message("x" * (1 << 20))))
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        denied = _post(server, _chat(user_message("?")), headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    missing = httpx.get(server.url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert e.value.status_code == 400

    messages = user_message("Still there?", data_url(picture(70, 40, 0)))
    expected = offline.generate(messages, max_new_tokens=10)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == expected.text
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_repeated_image_is_an_encoder_cache_hit_in_the_metrics(server, client):
    image = data_url(picture(36, 52, 99))  # an image no other test sends
    read = lambda key: metric(server.url, f"pixtral_fast_encoder_cache_{key}_total")  # noqa: E731
    before = {k: read(k) for k in ("hits", "misses", "evictions")}
    for turn in range(2):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=user_message(f"Turn {turn}?", image))
    after = {k: read(k) for k in ("hits", "misses", "evictions")}
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 1
    assert after["evictions"] == before["evictions"]
