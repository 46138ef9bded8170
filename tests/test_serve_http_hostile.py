"""The server against hostile HTTP clients, over real sockets: a fault's 500 keeps the keep-alive
connection, bad media URLs are 400s on that same connection, a client that half-closes its
socket still gets its answer, a request over the prompt-token bound is refused before any
prefill, and SIGTERM during a slow image fetch answers the documented JSON 503."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch
from starlette.responses import Response

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from tests.support.serve_server import CPU_ARGS, ServerProcess, data_url, metric, picture, user_message

PREFILL_BUDGET = 200  # --max-num-batched-tokens: the default bound on a request's prompt tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    picture(24, 24, 1).save(folder / "ok.png")
    (folder / "loop_a").symlink_to(folder / "loop_b")
    (folder / "loop_b").symlink_to(folder / "loop_a")
    return folder


@pytest.fixture(scope="module")
def server(tiny_dir, media_dir, tmp_path_factory):
    args = ["--model", str(tiny_dir), *CPU_ARGS, "--num-gpu-blocks-override", "256", "--max-model-len", "512",
            "--max-num-batched-tokens", str(PREFILL_BUDGET), "--allowed-local-media-path", str(media_dir),
            "--disable-uvicorn-access-log"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    assert proc.terminate() == 0, proc.log()


class Redirects(BaseHTTPRequestHandler):
    """GET /to?<location> answers 302 to that location; GET /slow waits until released."""
    hit = threading.Event()
    release = threading.Event()

    def do_GET(self):
        if self.path.startswith("/to?"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to?"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":
            Redirects.hit.set()
            Redirects.release.wait(60)
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirects)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Redirects.release.set()
    httpd.shutdown()
    httpd.server_close()


def chat(text: str, *urls: str, max_tokens: int = 2, **extra) -> dict:
    return {"messages": user_message(text, *urls), "max_tokens": max_tokens, "temperature": 0, **extra}


def one_connection() -> httpx.Client:
    """A client of one keep-alive connection that notes, in response.extensions["local_port"], the
    port of the connection each answer came on: equal ports, one connection."""
    def note_port(response: httpx.Response) -> None:
        sock = response.extensions["network_stream"].get_extra_info("socket")
        response.extensions["local_port"] = sock.getsockname()[1]

    return httpx.Client(timeout=60, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                        event_hooks={"response": [note_port]})


def local_port(response: httpx.Response) -> int:
    return response.extensions["local_port"]


# -- 1. an internal fault's 500 keeps the connection ---------------------------------------------

class InProcessServer:
    """uvicorn in a thread on a loopback port, over an engine whose faults the test plants."""

    def __init__(self, engine):
        import uvicorn

        from pixtral_fast.runtime.async_engine import AsyncEngine
        from pixtral_fast.serve.app import ServerSettings, build_app

        app = build_app(AsyncEngine(engine), ServerSettings(model_name="m"))
        app.add_route("/answered-then-fault", lambda request: AnsweredThenFault(b"answered"))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class AnsweredThenFault(Response):
    """A route's answer goes out whole, and then its code raises."""

    async def __call__(self, scope, receive, send):
        await super().__call__(scope, receive, send)
        raise RuntimeError("planted fault after the answer")


def fails_once(fn, message):
    failed = []

    def wrapper(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError(message)
        return fn(*args, **kwargs)
    return wrapper


def test_an_internal_fault_is_a_json_500_and_the_connection_serves_the_next_request(tiny_dir):
    engine = pf.Engine.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, backend="reference",
                                       num_blocks=64, progress=False)
    # a fault nothing maps to an error body (an engine fault is an APIError already): the app's own
    engine.tokenizer.encode = fails_once(engine.tokenizer.encode, "planted fault")
    served = InProcessServer(engine)
    try:
        with one_connection() as client:
            bad = client.post(served.url + "/v1/chat/completions", json=chat("Hello?"))
            good = client.post(served.url + "/v1/chat/completions", json=chat("Hello?"))
            answered = client.get(served.url + "/answered-then-fault")
            after = client.get(served.url + "/health")
    finally:
        served.close()
    assert bad.status_code == 500 and bad.headers["content-type"] == "application/json"
    assert bad.json()["error"]["code"] == "internal_error" and "planted fault" in bad.json()["error"]["message"]
    assert good.status_code == 200, good.text
    assert local_port(good) == local_port(bad), "the 500 closed the connection: the next request opened another"
    assert (answered.status_code, answered.content, after.status_code) == (200, b"answered", 200)
    assert local_port(after) == local_port(answered) == local_port(bad), "a fault after a whole answer closed it"


# -- 2. bad media URLs are 400s naming the problem, on the same connection ------------------------

def bad_media_urls(media_dir, web):
    name = "x" * 300
    return {
        "symlink loop": (f"file://{media_dir}/loop_a", "symlink loop"),
        "file name over NAME_MAX": (f"file://{media_dir}/{name}.png", "NAME_MAX"),
        "path over PATH_MAX": (f"file://{media_dir}/" + "/".join(["d" * 200] * 25), "PATH_MAX"),
        "unclosed IPv6 bracket": ("http://[::1", "not a valid URL"),
        "port out of range": ("http://127.0.0.1:99999/x.png", "not a valid URL"),
        "redirect to data:": (f"{web}/to?{data_url(picture(4, 4, 0))}", "redirected to 'data:image/png"),
        "redirect to file:": (f"{web}/to?file://{media_dir}/ok.png", "redirected to 'file:"),
        "redirect to ftp:": (f"{web}/to?ftp://example.com/x.png", "only redirects to http(s) URLs"),
        "file URL with a host": ("file://relative/ok.png", "names the host 'relative'"),
    }


def test_bad_media_urls_are_400s_that_name_the_problem_on_one_connection(server, media_dir, web):
    cases = bad_media_urls(media_dir, web)
    with one_connection() as client:
        ports = set()
        for case, (url, phrase) in cases.items():
            r = client.post(server.url + "/v1/chat/completions", json=chat("What is it?", url))
            assert r.status_code == 400, (case, r.text)
            error = r.json()["error"]
            assert phrase in error["message"], (case, error)
            assert error["param"] == "messages[0].content[0].image_url.url", (case, error)
            ports.add(local_port(r))
        ok = client.post(server.url + "/v1/chat/completions", json=chat("What is it?", f"file://{media_dir}/ok.png"))
        assert ok.status_code == 200, ok.text
        assert ports == {local_port(ok)}


# -- 4. a client that half-closes its socket gets its answer --------------------------------------

def test_a_client_that_half_closes_after_its_request_gets_the_answer(server):
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps(chat("Hello?")).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):  # the server closes once it has answered
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(payload)["choices"][0]["finish_reason"] in ("stop", "length")


# -- 5. the prompt-token bound refuses a request before any prefill -------------------------------

def test_prompt_tokens_past_the_bound_are_refused_before_any_prefill(server):
    url = server.url + "/v1/chat/completions"
    text = "word " * 50
    fits = httpx.post(url, json=chat(text), timeout=60)
    assert fits.status_code == 200, fits.text
    prompt = fits.json()["usage"]["prompt_tokens"]
    most_n = PREFILL_BUDGET // prompt
    assert 1 < most_n < 16, prompt  # n is at most 16 on the wire
    prefilled = metric(server.url, "pixtral_fast_prompt_tokens_total")

    too_long = httpx.post(url, json=chat("word " * PREFILL_BUDGET), timeout=60)
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["param"] == "messages" and error["code"] == "prompt_too_long"
    assert f"at most {PREFILL_BUDGET} prompt tokens" in error["message"] and "--max-prompt-tokens" in error["message"]

    too_many = httpx.post(url, json=chat(text, n=most_n + 1), timeout=60)  # each choice fits, together they do not
    assert too_many.status_code == 400, too_many.text
    assert too_many.json()["error"]["param"] == "n"
    assert f"n may be at most {most_n}" in too_many.json()["error"]["message"]
    assert metric(server.url, "pixtral_fast_prompt_tokens_total") == prefilled

    at_bound = httpx.post(url, json=chat(text, n=most_n), timeout=60)
    assert at_bound.status_code == 200, at_bound.text


@pytest.mark.parametrize("prompt, n, refused_param", [(100, 1, None), (101, 1, "messages"), (50, 2, None),
                                                     (51, 2, "n"), (34, 3, "n"), (101, 2, "messages")])
def test_the_prompt_token_bound_holds_exactly_at_prompt_times_n(prompt, n, refused_param):
    from pixtral_fast.serve.app import ServerSettings
    from pixtral_fast.serve.protocol import APIError

    settings = ServerSettings(model_name="m", max_prompt_tokens=100)
    if refused_param is None:
        settings.check_prompt_tokens(prompt, n)
        return
    with pytest.raises(APIError) as caught:
        settings.check_prompt_tokens(prompt, n)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, refused_param, "prompt_too_long")
    assert "at most 100 prompt tokens per request" in caught.value.message


def test_max_prompt_tokens_defaults_to_the_engines_prefill_budget():
    from pixtral_fast.cli import Parser
    from pixtral_fast.serve.command import add_serve_arguments, build_settings

    parser = Parser(prog="pixtral-fast serve")
    add_serve_arguments(parser)
    assert build_settings(parser.parse_args(["--tiny"]), "m", 16384).max_prompt_tokens == 16384
    chosen = parser.parse_args(["--tiny", "--max-prompt-tokens", "40000"])
    assert build_settings(chosen, "m", 16384).max_prompt_tokens == 40000
    assert build_settings(parser.parse_args(["--tiny"]), "m", 16384).body_read_timeout == 30.0
    assert build_settings(parser.parse_args(["--tiny", "--body-read-timeout", "2.5"]), "m", 1).body_read_timeout == 2.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--tiny", "--body-read-timeout", "0"])


# -- 3. SIGTERM during a slow image fetch is the documented JSON 503 -------------------------------

def test_sigterm_during_a_slow_image_fetch_answers_json_503_shutting_down(tiny_dir, web, tmp_path):
    grace = 1.0
    proc = ServerProcess(["--model", str(tiny_dir), *CPU_ARGS, "--num-gpu-blocks-override", "64",
                          "--max-model-len", "256", "--media-fetch-timeout", "120", "--shutdown-grace", str(grace)],
                         tmp_path / "server.log")
    try:
        Redirects.hit.clear()
        answer = {}
        asking = threading.Thread(target=lambda: answer.update(r=httpx.post(
            proc.url + "/v1/chat/completions", json=chat("What is it?", f"{web}/slow"), timeout=60)))
        asking.start()
        assert Redirects.hit.wait(30), "the server never fetched the image"
        t0 = time.monotonic()
        proc.proc.send_signal(15)
        asking.join(60)
        elapsed = time.monotonic() - t0
        assert proc.proc.wait(30) == 0, proc.log()
    finally:
        proc.kill()
    r = answer["r"]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
    assert elapsed < grace + 4, f"answered {elapsed:.1f} s after SIGTERM: later than the grace period allows"


def test_a_fetch_that_outlasts_uvicorns_shutdown_limit_still_answers_json_503(tiny_dir, web):
    """The engine takes longer to stop than uvicorn's graceful-shutdown limit (a step busy with a
    long prefill, say): uvicorn cancels the request still fetching its image, and the answer is
    the 503 `shutting_down`, not uvicorn's plain-text 500. In process: the server runs in this
    (main) thread, as its signal handlers need."""
    import asyncio

    import uvicorn

    from pixtral_fast.runtime.async_engine import AsyncEngine
    from pixtral_fast.serve.app import ServerSettings, build_app
    from pixtral_fast.serve.command import _graceful_server
    from pixtral_fast.serve.media import MediaLimits

    engine = AsyncEngine(pf.Engine.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32,
                                                   backend="reference", num_blocks=64, progress=False))
    closing = engine.aclose

    async def slow_aclose(grace: float = 0.0) -> None:
        await asyncio.sleep(1.0)  # past the 0.3 s uvicorn gives in-flight requests below
        await closing(grace)
    engine.aclose = slow_aclose
    app = build_app(engine, ServerSettings(model_name="m", media=MediaLimits(fetch_timeout=60)))
    server = _graceful_server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=0.3),
                              app.state.server, grace=0.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    answer = {}

    def ask_then_stop():
        while not server.started:
            time.sleep(0.05)
        asking = threading.Thread(target=lambda: answer.update(r=httpx.post(
            url, json=chat("What is it?", f"{web}/slow"), timeout=60)))
        asking.start()
        if Redirects.hit.wait(30):
            server.should_exit = True
        asking.join(60)

    Redirects.hit.clear()
    client = threading.Thread(target=ask_then_stop)
    client.start()
    server.run(sockets=[sock])
    client.join(60)
    sock.close()
    r = answer["r"]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "shutting_down"
