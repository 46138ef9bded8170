"""POST /v1/completions (OpenAI's legacy endpoint, as vLLM and llama.cpp serve it): one prompt,
a string or token ids, text only -> n sequences on the AsyncEngine -> one text_completion answer,
or an SSE stream of text_completion chunks ending in `data: [DONE]`.

A string prompt is the checkpoint's tokenizer's BOS + the text's tokens, no chat template; token
ids are taken as they are. The path from there is the chat endpoint's (serve/chat.py): the same
bounds, submission, stop strings, metrics and error mapping, and the same endings: finish_reason
'stop' or 'length', a request cut short is a 503 (or an error event in a stream)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from mistral_common.exceptions import MistralCommonException
from starlette.requests import Request

from pixtral_fast.images import shown
from pixtral_fast.runtime.async_engine import EngineFault, RequestStream
from pixtral_fast.runtime.sampling import SamplingParams, TokenLogprobs
from pixtral_fast.serve import completions_protocol as wire
from pixtral_fast.serve.chat import ChatHandler, SSEResponse, cut_short, merge_streams, read_body, sampling_params
from pixtral_fast.serve.completions_protocol import ECHO_LOGPROBS_MAX_TOKENS, CompletionRequest, LegacyLogprobs
from pixtral_fast.serve.metrics import ChoiceTimer, engine_death
from pixtral_fast.serve.protocol import APIError, now, parse_json, usage
from pixtral_fast.tokenizer import Encoded


@dataclass
class _Job:
    """A checked request with its prompt: the tokens, the text an echo prepends, and (echo with
    logprobs) a row per prompt token, the first without a logprob."""
    req: CompletionRequest
    tokens: list[int]
    echo_text: str = ""
    prompt_rows: list[tuple[int, TokenLogprobs | None]] = field(default_factory=list)


class CompletionsHandler(ChatHandler):
    """The chat handler's submission, waiting and error mapping (its _submit, _complete,
    _fault_error), with a prompt instead of messages and text_completion bodies."""

    async def __call__(self, request: Request):
        s = self.server
        arrival = time.perf_counter()
        body = await read_body(request, s.settings.max_request_bytes, s.settings.body_read_timeout)
        engine = s.engine.engine
        # parsing and checking every token id are proportional to the body: off the event loop
        req, prompt = await asyncio.to_thread(_parse, body, engine.vocab_size)
        self._check_model(req.model)
        stops = req.stop_strings()
        self._params(req, 1, 0)  # before tokenizing
        with _prompt_is_the_param():
            tokens = prompt.tokens if prompt.tokens is not None else await self._tokenize(prompt.text, req.n)
            s.settings.check_prompt_tokens(len(tokens), req.n)
        params = [self._params(req, len(tokens), i) for i in range(req.n)]
        check_echo_logprobs(req, len(tokens))
        with _prompt_is_the_param():
            streams = await self._submit(Encoded(tokens=tokens, images=[]), params, stops)
        s.metrics.prompt_tokens.inc(sum(st.prompt_tokens for st in streams))
        job = await self._job(req, prompt.text, tokens, streams)
        timers = [ChoiceTimer(s.metrics, arrival) for _ in streams]
        if req.stream:
            return SSEResponse(self._sse(job, streams, timers), streams, timers)
        return await self._complete(request, job, streams, timers)

    def _check_model(self, model: str | None) -> None:
        served = self.server.settings.model_name
        if model is not None and model != served:
            raise APIError(404, f"the model {shown(model)} does not exist; this server serves {served!r}",
                           "model", "model_not_found")

    def _params(self, req: CompletionRequest, prompt_tokens: int, index: int) -> SamplingParams:
        """chat.sampling_params over the request's fields; legacy logprobs (an int, 0 included)
        is chat's logprobs: true with that many top_logprobs."""
        engine = self.server.engine.engine
        view = _ChatFields(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                           top_k=req.top_k, seed=req.seed, logprobs=req.logprobs is not None,
                           top_logprobs=req.logprobs)
        try:
            return sampling_params(view, prompt_tokens, engine.max_model_len, engine.vocab_size, index)
        except APIError as e:
            if e.param == "top_logprobs":
                e.param = "logprobs"
            raise

    async def _tokenize(self, text: str, n: int) -> list[int]:
        """BOS + the text's tokens (no chat template). A text surely over --max-prompt-tokens is
        refused before tokenizing: B bytes are at least B / (longest token's bytes) tokens."""
        s = self.server
        tokenizer = s.engine.engine.tokenizer
        if s.settings.max_prompt_tokens is not None:
            at_least = await asyncio.to_thread(lambda: _utf8_bytes(text) // tokenizer.longest_token_bytes)
            s.settings.check_prompt_tokens(at_least, n, at_least=True)
        try:
            return await s.engine.run_in_pool(lambda: tokenizer.tekken.encode(text, bos=True, eos=False))
        except (ValueError, MistralCommonException) as e:
            raise APIError(400, f"prompt: the text cannot be tokenized: {e}", "prompt") from None

    async def _job(self, req: CompletionRequest, text: str | None, tokens: list[int],
                   streams: list[RequestStream]) -> _Job:
        """The echo's text and prompt logprobs, computed while the sequences already run."""
        if not req.echo:
            return _Job(req, tokens)
        tokenizer = self.server.engine.engine.tokenizer
        try:
            echo_text = text if text is not None else await asyncio.to_thread(tokenizer.decode, tokens)
            rows = await self._prompt_rows(tokens, req.logprobs) if req.logprobs is not None else []
        except BaseException as e:
            for st in streams:
                st.abort()
            if isinstance(e, Exception) and engine_death(self.server.engine) is not None:
                raise self._engine_unavailable(e) from None
            raise
        return _Job(req, tokens, echo_text, rows)

    async def _prompt_rows(self, tokens: list[int], top: int) -> list[tuple[int, TokenLogprobs | None]]:
        engine = self.server.engine.engine
        return await self.server.engine.run_in_pool(prompt_logprob_rows, engine, tokens, top)

    def _completion_json(self, job: _Job, streams: list[RequestStream], results: list) -> bytes:
        """The text_completion body (chat's _complete calls this with each choice's text and logprobs)."""
        choices = []
        for i, ((text, lps), st) in enumerate(zip(results, streams)):
            logprobs = None
            if job.req.logprobs is not None:
                writer, echoed = self._logprob_writer(job)
                generated = writer.of(_rows(lps, st))
                logprobs = {key: echoed[key] + generated[key] for key in generated}
            choices.append(wire.completion_choice(i, job.echo_text + text, st.finish_reason, logprobs))
        used = usage(streams[0].prompt_tokens, sum(len(st.token_ids) for st in streams))
        body = wire.completion_body(wire.new_id(), now(), self.server.settings.model_name, choices, used)
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    def _logprob_writer(self, job: _Job) -> tuple[LegacyLogprobs, dict]:
        """A choice's legacy logprobs writer, past the echoed prompt, and the prompt's part."""
        writer = LegacyLogprobs(self.server.engine.engine.tokenizer.tekken)
        echoed = writer.of(job.prompt_rows)
        writer.offset = len(job.echo_text)  # the generated text starts after the echo, whatever its pieces
        return writer, echoed

    async def _sse(self, job: _Job, streams: list[RequestStream], timers) -> AsyncIterator[bytes]:
        rid, created, model = wire.new_id(), now(), self.server.settings.model_name
        req = job.req
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        writers = [self._logprob_writer(job) for _ in streams]

        def event(choices: list[dict], usage_: dict | None = None) -> bytes:
            body = wire.chunk_body(rid, created, model, choices, include_usage, usage_)
            return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

        def logprobs(i: int, rows: list) -> dict | None:
            return writers[i][0].of(rows) if req.logprobs is not None else None

        if req.echo:
            for i in range(len(streams)):
                echoed = writers[i][1] if req.logprobs is not None else None
                yield event([wire.completion_choice(i, job.echo_text, None, echoed)])
        error: APIError | None = None
        try:
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                async for i, delta in merged:
                    timers[i].tokens(len(delta.token_ids))
                    lps = logprobs(i, _rows(delta.logprobs, streams[i]))
                    if delta.text or (lps and lps["tokens"]):
                        yield event([wire.completion_choice(i, delta.text, None, lps)])
                    if delta.finish_reason == "abort":  # not an OpenAI finish_reason: an error event
                        timers[i].finish("abort")
                        error = cut_short()
                        break
                    if delta.finish_reason is not None:
                        timers[i].finish(delta.finish_reason)
                        yield event([wire.completion_choice(i, "", delta.finish_reason, None)])
        except EngineFault as e:
            error = self._fault_error(e)
        used = usage(streams[0].prompt_tokens, sum(len(st.token_ids) for st in streams))
        for chunk in self._sse_end(error, event([], used) if include_usage else None):
            yield chunk


@dataclass
class _ChatFields:
    """The fields chat.sampling_params reads from a chat request."""
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    logprobs: bool
    top_logprobs: int | None
    max_completion_tokens: None = None


@torch.inference_mode()  # prompt_logits' tensor is an inference tensor: normalized in place
def prompt_logprob_rows(engine, tokens: list[int], top: int) -> list[tuple[int, TokenLogprobs | None]]:
    """Each prompt token with its logprob given the tokens before it (log_softmax of the raw
    logits, as the engine's generated logprobs) and the `top` most likely there; the first token
    has none. Through the engine's prompt_logits: one forward pass without cache."""
    logprobs = engine.prompt_logits(tokens)[:-1]
    logprobs -= logprobs.logsumexp(dim=-1, keepdim=True)  # in place: [tokens, vocabulary] is the big one
    following = torch.tensor(tokens[1:])
    chosen = logprobs.gather(1, following[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(top, dim=-1)
    rows: list[tuple[int, TokenLogprobs | None]] = [(tokens[0], None)]
    for j, token in enumerate(tokens[1:]):
        rows.append((token, TokenLogprobs(token, chosen[j], list(zip(top_ids[j].tolist(), top_values[j].tolist())))))
    return rows


def check_echo_logprobs(req: CompletionRequest, prompt_tokens: int) -> None:
    """Prompt logprobs hold the prompt's [tokens, vocabulary] logits at once: a bounded prompt."""
    if req.echo and req.logprobs is not None and prompt_tokens > ECHO_LOGPROBS_MAX_TOKENS:
        raise APIError(400, f"echo: the prompt's logprobs are computed for prompts of at most "
                            f"{ECHO_LOGPROBS_MAX_TOKENS} tokens; this one has {prompt_tokens} (send echo "
                            "without logprobs, or a shorter prompt)", "echo")


def _rows(logprobs: list[TokenLogprobs], st: RequestStream) -> list[tuple[int, TokenLogprobs]]:
    """Generated tokens' rows; a stop token (EOS) is not part of the text, as in chat's logprobs."""
    return [(lp.token, lp) for lp in logprobs if lp.token not in st.stop_token_ids]


@contextlib.contextmanager
def _prompt_is_the_param():
    """The chat path's errors about the prompt name `messages`; here it is the request's `prompt`."""
    try:
        yield
    except APIError as e:
        if e.param != "messages":
            raise
        message = e.message.removeprefix("messages: ")
        raise APIError(e.status, f"prompt: {message}", "prompt", e.code, e.headers) from None


def _parse(body: bytes, vocab_size: int):
    return wire.parse_request(parse_json(body), vocab_size)


def _utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))
