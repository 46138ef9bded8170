"""POST /v1/completions on the real server (one subprocess on the tiny checkpoint), driven by the
official openai client and, for hostile bodies, raw httpx. Every answer is compared with the
offline Engine on the same token ids: a string prompt is BOS + the text's tokens, no template."""
import asyncio
import json

import httpx
import openai
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.async_engine import AsyncEngine
from pixtral_fast.runtime.output import MAX_STOP
from pixtral_fast.serve.app import ServerSettings, build_app
from pixtral_fast.serve.completions import check_echo_logprobs
from pixtral_fast.serve.completions_protocol import ECHO_LOGPROBS_MAX_TOKENS, CompletionRequest
from pixtral_fast.serve.protocol import APIError
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded
from tests.support.serve_server import CPU_ARGS, ServerProcess

KEY = "sk-test-key"
MODEL = "tiny-pixtral"
MAX_MODEL_LEN = 512
MAX_PROMPT_TOKENS = 1000   # above MAX_MODEL_LEN: both bounds can be reached
PROMPT = "The quick brown fox jumps over the lazy dog, and then"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory, request):
    args = ["--model", str(tiny_dir), *CPU_ARGS, "--served-model-name", MODEL, "--api-key", KEY,
            "--num-gpu-blocks-override", "512", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--disable-uvicorn-access-log"]
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


def raw(server, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)


def prompt_ids(offline, text: str) -> list[int]:
    return offline.tokenizer.tekken.encode(text, bos=True, eos=False)


@pytest.fixture(scope="module")
def greedy_16(offline):
    """The offline engine's greedy answer to PROMPT's token ids, 16 new tokens."""
    return offline.generate(Encoded(tokens=prompt_ids(offline, PROMPT), images=[]), max_new_tokens=16)


def streamed(chunks) -> tuple[dict[int, str], dict[int, str], object]:
    texts, finishes, usage = {}, {}, None
    for chunk in chunks:
        assert chunk.object == "text_completion"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage


@pytest.mark.parametrize("form", ["string", "token ids", "one string in a list", "one token list in a list"])
def test_greedy_text_equals_the_offline_engine_on_the_same_token_ids(server, client, offline, greedy_16, form):
    ids = prompt_ids(offline, PROMPT)
    prompt = {"string": PROMPT, "token ids": ids, "one string in a list": [PROMPT],
              "one token list in a list": [ids]}[form]
    expected = greedy_16

    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == MODEL
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(expected.tokens))
    assert got.usage.total_tokens == len(ids) + len(expected.tokens)
    assert got.choices[0].logprobs is None


def test_max_tokens_defaults_to_16_as_openai(server, client, greedy_16):
    assert greedy_16.finish_reason == "length"  # else 16 would not be seen
    got = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    assert (got.choices[0].text, got.usage.completion_tokens) == (greedy_16.text, 16)


def test_streamed_and_plain_equal_for_the_same_seed(server, client, offline):
    asked = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7, n=3)
    plain = client.completions.create(**asked)
    chunks = list(client.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    texts, finishes, usage = streamed(chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices == []
    assert texts == {c.index: c.text for c in plain.choices}
    assert finishes == {c.index: c.finish_reason for c in plain.choices}
    assert len(set(texts.values())) > 1  # choice i has seed + i
    assert (usage.prompt_tokens, usage.completion_tokens) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert plain.usage.prompt_tokens == len(prompt_ids(offline, PROMPT))


def test_a_stop_string_ends_the_text_plain_and_streamed(server, client, offline, greedy_16):
    ids = prompt_ids(offline, PROMPT)
    stop = greedy_16.text[len(greedy_16.text) // 2:][:3]
    assert stop.strip(), greedy_16.text  # a visible piece of the middle of the text
    expected = offline.generate(Encoded(tokens=ids, images=[]), max_new_tokens=16, stop=stop)
    assert expected.finish_reason == "stop" and stop not in expected.text

    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0, stop=[stop])
    assert (plain.choices[0].text, plain.choices[0].finish_reason) == (expected.text, "stop")
    texts, finishes, _ = streamed(client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0,
                                                            stop=stop, stream=True))
    assert (texts[0], finishes[0]) == (expected.text, "stop")


def test_logprobs_match_the_offline_engine_and_echo_prepends_the_prompt(server, client, offline):
    ids = prompt_ids(offline, PROMPT)
    expected = offline.generate(Encoded(tokens=ids, images=[]), max_new_tokens=6, logprobs=3)
    prompt_lp = offline.prompt_logits(ids).log_softmax(-1)

    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=3)
    choice = got.choices[0]
    choice_lp = choice.logprobs
    assert choice.text == PROMPT + expected.text
    n_prompt, n_new = len(ids), len([t for t in expected.tokens if t != offline.tokenizer.eos_id])
    assert len(choice_lp.tokens) == len(choice_lp.token_logprobs) == len(choice_lp.text_offset) == n_prompt + n_new
    assert choice_lp.token_logprobs[0] is None and choice_lp.top_logprobs[0] is None
    want_prompt = [prompt_lp[i - 1, ids[i]].item() for i in range(1, n_prompt)]
    assert choice_lp.token_logprobs[1:n_prompt] == pytest.approx(want_prompt, abs=1e-4)
    want_new = [lp.logprob for lp in expected.logprobs[:n_new]]
    assert choice_lp.token_logprobs[n_prompt:] == pytest.approx(want_new, abs=1e-4)
    for i in range(1, n_prompt):  # the 3 most likely next tokens, by value
        want_top = prompt_lp[i - 1].topk(3).values.tolist()
        assert sorted(choice_lp.top_logprobs[i].values(), reverse=True) == pytest.approx(want_top, abs=1e-4)
    assert choice_lp.text_offset[n_prompt] == len(PROMPT)
    assert choice_lp.text_offset == sorted(choice_lp.text_offset)
    assert "".join(choice_lp.tokens[1:n_prompt]) == PROMPT  # BOS is at offset 0 and takes no text

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                            logprobs=3, stream=True))
    texts, _, _ = streamed(chunks)
    assert texts[0] == choice.text
    lps = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((lp.token_logprobs for lp in lps), []) == choice_lp.token_logprobs
    assert sum((lp.text_offset for lp in lps), []) == choice_lp.text_offset


def test_echo_of_token_ids_is_their_text_and_the_offsets_follow_it(server, client, offline):
    """The emoji's four byte tokens each read "\ufffd" alone: the generated text's offsets start
    after the echoed text, not after the pieces."""
    ids = prompt_ids(offline, "\N{FOX FACE} fox")
    assert len(ids) == 6
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=1)
    choice = got.choices[0]
    assert choice.text.startswith("\N{FOX FACE} fox")
    assert choice.logprobs.text_offset[len(ids)] == len("\N{FOX FACE} fox")


def test_n_with_stream_gives_every_choice_its_chunks(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPT, "max_tokens": 4, "n": 2, "stream": True, "seed": 1}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert {b["object"] for b in bodies} == {"text_completion"}
    finished = {c["index"]: c["finish_reason"] for b in bodies for c in b["choices"] if c["finish_reason"]}
    assert finished == {0: "length", 1: "length"}


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


HOSTILE = {
    "a number": ({"prompt": 12}, "prompt", "got a int"),
    "an object": ({"prompt": {"text": "hi"}}, "prompt", "got a dict"),
    "null": ({"prompt": None}, "prompt", "got a NoneType"),
    "missing": ({}, "prompt", "missing"),
    "a string among ids": ({"prompt": [1, "two"]}, "prompt", "prompt[1]: a token id must be an integer"),
    "a bool among ids": ({"prompt": [1, True]}, "prompt", "prompt[1]: a token id must be an integer"),
    "a float among ids": ({"prompt": [1, 2.0]}, "prompt", "prompt[1]: a token id must be an integer"),
    "an id past the vocabulary": ({"prompt": [1, 131072]}, "prompt", "token id 131072 is out of the vocabulary"),
    "a negative id": ({"prompt": [-1]}, "prompt", "token id -1 is out of the vocabulary"),
    "an image token without its image": ({"prompt": [1, 10, 10, 13]}, "prompt", "image"),
    "a batch of strings": ({"prompt": ["a", "b"]}, "prompt", "a batch of 2 prompts"),
    "a batch of token lists": ({"prompt": [[1, 2], [3]]}, "prompt", "a batch of 2 prompts"),
    "an empty string": ({"prompt": ""}, "prompt", "empty"),
    "an empty list": ({"prompt": []}, "prompt", "empty"),
    "an empty token list in a list": ({"prompt": [[]]}, "prompt", "empty"),
    "suffix": ({"prompt": "a", "suffix": "b"}, "suffix", "suffix is not supported"),
    "logprobs 6": ({"prompt": "a", "logprobs": 6}, "logprobs", "5"),
    "logprobs true": ({"prompt": "a", "logprobs": True}, "logprobs", "integer"),
    "echo as a string": ({"prompt": "a", "echo": "yes"}, "echo", "boolean"),
    "best_of 2": ({"prompt": "a", "best_of": 2}, "best_of", "not supported"),
    "a penalty": ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    "stream_options without stream": ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options",
                                      "stream: true"),
    "too many stop strings": ({"prompt": "a", "stop": ["x"] * (MAX_STOP + 1)}, "stop", f"at most {MAX_STOP}"),
    "max_tokens past the context": ({"prompt": [1] * 500, "max_tokens": 20}, "max_tokens", "leaves 12"),
    "a prompt over max_model_len": ({"prompt": [1] * MAX_MODEL_LEN}, "prompt", f"max_model_len is {MAX_MODEL_LEN}"),
    "a prompt over --max-prompt-tokens": ({"prompt": [1] * (MAX_PROMPT_TOKENS + 1)}, "prompt", "--max-prompt-tokens"),
    "a text surely over --max-prompt-tokens": ({"prompt": "x" * 200_000}, "prompt", "at least"),
    "n choices over --max-prompt-tokens": ({"prompt": [1] * 400, "n": 3}, "n", "--max-prompt-tokens"),
}


@pytest.mark.parametrize("body, param, says", HOSTILE.values(), ids=HOSTILE.keys())
def test_bad_input_is_a_400_naming_the_parameter(server, body, param, says):
    error = error_of(raw(server, body))
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert says in error["message"]
    if param == "prompt":
        assert error["message"].startswith("prompt")


def test_echo_with_logprobs_of_a_long_prompt_and_its_bound(server):
    ids = [1] + [1000 + i for i in range(MAX_MODEL_LEN - 2)]
    got = raw(server, {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert len(got["token_logprobs"]) == len(ids) + 1 and got["top_logprobs"][1:] == [{}] * len(ids)
    # the bound (past this server's context): checked before any work
    request = CompletionRequest(prompt="a", echo=True, logprobs=0)
    check_echo_logprobs(request, ECHO_LOGPROBS_MAX_TOKENS)
    with pytest.raises(APIError, match=f"at most {ECHO_LOGPROBS_MAX_TOKENS} tokens") as refused:
        check_echo_logprobs(request, ECHO_LOGPROBS_MAX_TOKENS + 1)
    assert refused.value.param == "echo"
    check_echo_logprobs(CompletionRequest(prompt="a", echo=True), ECHO_LOGPROBS_MAX_TOKENS + 1)


def test_model_and_api_key_are_checked_as_on_the_chat_endpoint(server):
    assert error_of(raw(server, {"prompt": "a", "model": "other"}), 404)["code"] == "model_not_found"
    assert error_of(raw(server, {"prompt": "a"}, key=None), 401)["code"] == "invalid_api_key"
    assert error_of(raw(server, {"prompt": "a"}, key="wrong"), 401)["code"] == "invalid_api_key"


# -- in process: faults injected into an engine of the offline model ------------------------------

def in_process(offline, bodies: list[dict], fault=None, closed: bool = False):
    """Each body's answer from an app over a fresh engine (`fault(engine)` breaks it first), and
    what the engine held after the last answer."""
    engine = pf.Engine.from_model(offline.model, offline.tokenizer, num_blocks=64, progress=False)
    if fault is not None:
        fault(engine)

    async def run():
        ae = AsyncEngine(engine).start()
        app = build_app(ae, ServerSettings(model_name=MODEL))
        if closed:
            await ae.aclose()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                         base_url="http://test", timeout=60) as client:
                answers = [await client.post("/v1/completions", json=body) for body in bodies]
                return answers, engine.usage()
        finally:
            await ae.aclose()
    return asyncio.run(run())


def test_a_fault_in_the_prompt_logprobs_is_a_500_that_ends_the_running_choices(offline):
    def break_prompt_logits(engine):
        engine.prompt_logits = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected prompt fault"))

    long_echo = {"prompt": PROMPT, "max_tokens": 900, "echo": True, "logprobs": 1, "n": 2}
    (bad, good), held = in_process(offline, [long_echo, {"prompt": PROMPT, "max_tokens": 2}], break_prompt_logits)
    error = error_of(bad, 500)
    assert "injected prompt fault" in error["message"] and error["type"] == "server_error"
    assert good.status_code == 200
    assert (held.running, held.waiting) == (0, 0)  # the 900-token choices were aborted, not left running


def test_a_closed_engine_is_a_503_with_retry_after(offline):
    ids = prompt_ids(offline, PROMPT)  # (a closed engine's tokenizing pool is gone; a server's answers 503 before)
    (answer,), _ = in_process(offline, [{"prompt": ids, "max_tokens": 2}], closed=True)
    assert error_of(answer, 503)["code"] == "shutting_down" and answer.headers["retry-after"] == "1"
