"""A real internal fault (injected into the engine) is a 500 with a message, plain or inside the
stream, and the server goes on answering. In-process: the app over httpx's ASGI transport."""
import asyncio
import json

import httpx
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.async_engine import AsyncEngine
from pixtral_fast.serve.app import ServerSettings, build_app
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer
from tests.support.serve_server import user_message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return model, Tokenizer.for_checkpoint(folder)


def fails_once(fn, message):
    state = {"failed": False}

    def wrapper(*args, **kwargs):
        if not state["failed"]:
            state["failed"] = True
            raise RuntimeError(message)
        return fn(*args, **kwargs)
    return wrapper


async def exchange(engine, requests):
    ae = AsyncEngine(engine).start()
    app = build_app(ae, ServerSettings(model_name="m"))
    app.state.server.http = httpx.AsyncClient()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://test") as client:
            return [await client.post("/v1/chat/completions", json=body) for body in requests]
    finally:
        await ae.aclose()


def body(stream=False):
    return {"messages": user_message("Hello?"), "max_tokens": 4, "temperature": 0, "stream": stream}


@pytest.mark.parametrize("where", ["add_request", "step"])
def test_an_engine_fault_is_a_500_and_the_next_request_is_served(tiny, where):
    engine = pf.Engine.from_model(*tiny, num_blocks=64, progress=False)
    expected = engine.generate(user_message("Hello?"), max_new_tokens=4).text
    setattr(engine, where, fails_once(getattr(engine, where), "injected fault"))
    bad, good = asyncio.run(exchange(engine, [body(), body()]))
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert "injected fault" in error["message"] and error["type"] == "server_error"
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == expected
    assert engine.usage().used_blocks == 0


def test_a_fault_inside_a_stream_ends_it_with_an_error_event(tiny):
    engine = pf.Engine.from_model(*tiny, num_blocks=64, progress=False)
    engine.step = fails_once(engine.step, "injected mid-stream fault")
    streamed, after = asyncio.run(exchange(engine, [body(stream=True), body()]))
    assert streamed.status_code == 200  # the headers were out before the fault
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "injected mid-stream fault" in json.loads(events[-2])["error"]["message"]
    assert after.status_code == 200
