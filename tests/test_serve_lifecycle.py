"""The server under pressure and at its end: a full waiting queue answers 503 with Retry-After
(and the queued request still runs), and SIGTERM with requests in flight lets the short one
finish, ends the long ones inside the grace period (a plain request with a 503, a stream with an
error event; never a made-up finish_reason), and exits 0. Nonsense flags never start a server."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pixtral_fast.tiny import make_tiny
from tests.support.serve_server import CPU_ARGS, ServerProcess, metric, user_message

GRACE_S = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = make_tiny(tmp_path_factory.mktemp("tiny"), seed=1)
    args = ["--model", str(tiny), *CPU_ARGS, "--num-gpu-blocks-override", "256", "--max-num-seqs", "2",
            "--max-waiting", "1", "--shutdown-grace", str(GRACE_S)]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    proc.kill()


def chat(text: str, max_tokens: int, stream: bool = False) -> dict:
    return {"messages": user_message(text), "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def events(lines) -> list[dict | str]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_full_waiting_queue_answers_503_with_retry_after(server):
    url = server.url + "/v1/chat/completions"
    with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b, ThreadPoolExecutor(1) as pool:
        with a.stream("POST", url, json=chat("first, long", 100000, stream=True)) as first:
            first_lines = first.iter_lines()  # kept: a dropped line iterator closes the connection
            next(first_lines)
            wait_for(lambda: metric(server.url, "pixtral_fast_requests_running") == 1)  # no longer waiting
            with b.stream("POST", url, json=chat("second, long", 100000, stream=True)) as second:
                second_lines = second.iter_lines()
                next(second_lines)
                wait_for(lambda: metric(server.url, "pixtral_fast_requests_running") == 2)
                queued = pool.submit(httpx.post, url, json=chat("third waits", 5), timeout=60)
                wait_for(lambda: metric(server.url, "pixtral_fast_requests_waiting") == 1)
                refused = httpx.post(url, json=chat("fourth is refused", 5), timeout=60)
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "server_overloaded"
                assert refused.json()["error"]["type"] == "server_error"
        done = queued.result(timeout=60)  # the long ones were closed: the queued request runs
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
    wait_for(lambda: metric(server.url, "pixtral_fast_kv_cache_used_blocks") == 0)


def test_sigterm_finishes_short_requests_cuts_long_ones_and_exits_0(server):
    url = server.url + "/v1/chat/completions"
    with httpx.Client(timeout=60) as a, ThreadPoolExecutor(2) as pool:
        with a.stream("POST", url, json=chat("never ends", 100000, stream=True)) as long_one:
            lines = long_one.iter_lines()
            next(lines)
            short = pool.submit(httpx.post, url, json=chat("short", 40), timeout=60)
            wait_for(lambda: metric(server.url, "pixtral_fast_requests_running") == 2)
            long_plain = pool.submit(httpx.post, url, json=chat("never ends either", 100000), timeout=60)
            wait_for(lambda: metric(server.url, "pixtral_fast_requests_waiting") == 1)
            t0 = time.monotonic()
            server.proc.send_signal(15)
            tail = events(lines)  # read until the server closes the stream
            elapsed = time.monotonic() - t0
        finished, cut = short.result(timeout=60), long_plain.result(timeout=60)
    assert finished.status_code == 200
    assert finished.json()["choices"][0]["finish_reason"] == "length"
    assert finished.json()["usage"]["completion_tokens"] == 40
    # cut short: no OpenAI finish_reason fits ('length' would say it hit max_tokens)
    assert cut.status_code == 503, cut.text
    assert cut.json()["error"]["code"] == "shutting_down" and cut.json()["error"]["message"]
    assert tail[-1] == "[DONE]" and tail[-2]["error"]["code"] == "shutting_down"
    assert not [c["finish_reason"] for e in tail[:-2] for c in e["choices"] if c["finish_reason"]]
    assert GRACE_S - 1 < elapsed < GRACE_S + 10
    assert server.proc.wait(30) == 0, server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


BAD_FLAGS = {
    "--shutdown-grace -1": (["--shutdown-grace", "-1"], "--shutdown-grace"),
    "--shutdown-grace nan": (["--shutdown-grace", "nan"], "--shutdown-grace"),
    "--media-fetch-timeout -1": (["--media-fetch-timeout", "-1"], "--media-fetch-timeout"),
    "--media-fetch-timeout 0": (["--media-fetch-timeout", "0"], "--media-fetch-timeout"),
    "--port -5": (["--port", "-5"], "--port"),
    "--port 70000": (["--port", "70000"], "0..65535"),
    "--gpu-memory-utilization 2": (["--gpu-memory-utilization", "2"], "--gpu-memory-utilization"),
    "--allowed-local-media-path missing": (["--allowed-local-media-path", "/nonexistent"], "no such folder"),
}


@pytest.mark.parametrize("flags, phrase", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_nonsense_serve_flags_are_refused_in_one_line(flags, phrase, capsys, monkeypatch):
    from pixtral_fast import cli

    monkeypatch.setattr("pixtral_fast.serve.command.run_serve", lambda a: pytest.fail("the server started"))
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--tiny", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("pixtral-fast: error:") and phrase in err[0]


def test_a_model_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    from pixtral_fast import cli

    model = tmp_path / "consolidated.safetensors"
    model.write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--model", str(model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "is a file, not a folder" in err[0]
