"""POST /v1/chat/completions: request -> encoded prompt -> n sequences on the AsyncEngine ->
one JSON answer, or an SSE stream of chat.completion.chunk objects ending in `data: [DONE]`.

finish_reason on the wire is only ever OpenAI's 'stop', 'length' or 'tool_calls' (a choice whose
tokens are a complete [TOOL_CALLS] array: its calls are parsed from the token ids, and a stream
holds their text back and sends each call whole, as one `delta.tool_calls` entry, at the end). A request the engine ends
before it finishes (shutdown past its grace period, or the engine stopping) is not a 'length':
a plain request then gets a 503 error body (code 'shutting_down', Retry-After); a stream, whose
200 is already out, ends with an OpenAI-style `data: {"error": {...}}` event and then
`data: [DONE]`. An internal fault is the same with a 500."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from mistral_common.exceptions import MistralCommonException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pixtral_fast.images import shown
from pixtral_fast.runtime.async_engine import Delta, EngineClosed, EngineFault, QueueFull, RequestStream
from pixtral_fast.runtime.engine import RequestError
from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.runtime.structured_output import Grammar
from pixtral_fast.runtime.tool_calls import ToolGrammar
from pixtral_fast.serve import protocol as wire
from pixtral_fast.serve.media import fetch_remote, load_images, parse_messages
from pixtral_fast.serve.metrics import ChoiceTimer, engine_death
from pixtral_fast.serve.protocol import APIError, ChatRequest

log = logging.getLogger("pixtral_fast.serve")
RETRY_AFTER_S = 1
SAMPLING_PARAM_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                        "top_k": "top_k", "seed": "seed", "logprobs": "top_logprobs"}


async def read_body(request: Request, cap: int, timeout: float) -> bytes:
    """The body, refused with 413 past `cap` bytes (declared or actually sent), and with 408 when
    it has not all arrived within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await _read_capped(request, cap)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s (--body-read-timeout)",
                       code="request_timeout") from None


async def _read_capped(request: Request, cap: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # else its bytes would be read as JSON and refused as such
        raise APIError(415, f"the request body's Content-Encoding {shown(encoding)} is not read; "
                            "send the JSON uncompressed", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {cap} (--max-request-bytes)",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise APIError(413, f"the request body is over the limit of {cap} bytes (--max-request-bytes)",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def sampling_params(req: ChatRequest, prompt_tokens: int, max_model_len: int, vocab_size: int,
                    index: int) -> SamplingParams:
    """Choice `index` of the request. Seeded requests give choice i the seed + i, so that the n
    choices differ and each is reproducible alone. A bad value is a 400 naming its parameter
    (also the bounds that depend on the model, such as top_k <= the vocabulary)."""
    room = max_model_len - prompt_tokens
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and 0 < room < asked:  # (no room at all: the engine refuses the prompt, naming messages)
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param}: {asked} new tokens do not fit: the context holds {max_model_len} tokens "
                            f"and the prompt has {prompt_tokens}, which leaves {room}", param)
    max_new = asked or max(1, room)
    extra = {"logprobs": req.top_logprobs or 0} if req.logprobs else {}
    try:
        params = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                                top_k=max(req.top_k, 0), seed=None if req.seed is None else req.seed + index,
                                **extra)
        params.check_vocab(vocab_size)
        return params
    except ValueError as e:
        name = str(e).split()[0]
        param = SAMPLING_PARAM_NAMES.get(name)
        if param == "max_tokens" and req.max_completion_tokens:
            param = "max_completion_tokens"
        raise APIError(400, str(e), param) from None


class ChatHandler:
    def __init__(self, server):
        self.server = server   # serve.app.ServerState: engine, settings, metrics, http client

    async def __call__(self, request: Request):
        s = self.server
        arrival = time.perf_counter()
        body = await read_body(request, s.settings.max_request_bytes, s.settings.body_read_timeout)
        # parsing is proportional to the body (megabytes): off the event loop
        req = await asyncio.to_thread(_parse, body, s.settings.media.max_images_per_prompt)
        if req.model is not None and req.model != s.settings.model_name:
            raise APIError(404, f"the model {shown(req.model)} does not exist; this server serves "
                                f"{s.settings.model_name!r}", "model", "model_not_found")
        stops = req.stop_strings()
        engine = s.engine.engine
        sampling_params(req, 1, engine.max_model_len, engine.vocab_size, 0)  # before encoding
        grammar = await self._grammar(req.response_format)
        toolset = await self._tools(req)
        if grammar is not None and toolset is not None:
            raise APIError(400, "response_format and tools cannot be combined: give one of them", "response_format")
        await self._check_prompt_bytes(req)
        encoded = await self._encode(req, toolset)
        s.settings.check_prompt_tokens(len(encoded.tokens), req.n)
        params = [sampling_params(req, len(encoded.tokens), engine.max_model_len, engine.vocab_size, i)
                  for i in range(req.n)]
        streams = await self._submit(encoded, params, stops, grammar or toolset)
        s.metrics.prompt_tokens.inc(sum(st.prompt_tokens for st in streams))
        timers = [ChoiceTimer(s.metrics, arrival) for _ in streams]
        calls = _CallReader(toolset, [p.seed for p in params])
        if req.stream:
            return SSEResponse(self._sse(req, streams, timers, calls), streams, timers)
        return await self._complete(request, req, streams, timers, calls)

    async def _check_prompt_bytes(self, req: ChatRequest) -> None:
        """Refuses, before tokenizing it, a prompt whose text alone is surely over
        --max-prompt-tokens: B bytes of text are at least B / (longest token's bytes) tokens."""
        s = self.server
        if s.settings.max_prompt_tokens is None:
            return
        tokenizer = s.engine.engine.tokenizer
        at_least = await asyncio.to_thread(lambda: _text_bytes(req.messages) // tokenizer.longest_token_bytes)
        s.settings.check_prompt_tokens(at_least, req.n, at_least=True)

    async def _encode(self, req: ChatRequest, toolset: ToolGrammar | None = None):
        s = self.server
        prompt = await asyncio.to_thread(parse_messages, req.messages, s.settings.media)
        if toolset is not None:  # shown to the model in the prompt, as mistral_common lays them out
            prompt.tools = toolset.tools
        await fetch_remote(prompt.images, s.settings.media, s.http)
        tokenizer = s.engine.engine.tokenizer

        def encode():
            load_images(prompt.images, s.settings.media, tokenizer.max_image_side)
            return tokenizer.encode(prompt)

        try:
            return await s.engine.run_in_pool(encode)
        except (ValueError, MistralCommonException) as e:
            raise APIError(400, str(e), "messages") from None

    async def _grammar(self, response_format) -> Grammar | None:
        """The response format compiled (in the pool: a schema takes milliseconds, a first one
        the tokenizer's vocabulary for about a second); a 400 naming what cannot be honoured."""
        if response_format in (None, {"type": "text"}):
            return None
        engine = self.server.engine
        try:
            return await engine.run_in_pool(lambda: engine.engine.response_format_grammar(response_format))
        except ValueError as e:
            raise APIError(400, str(e), "response_format") from None

    async def _tools(self, req: ChatRequest) -> ToolGrammar | None:
        """The tools compiled (in the pool, as a response format); a 400 naming the field at fault."""
        if req.tools is None and req.tool_choice in (None, "none", "auto"):
            return None
        engine = self.server.engine
        try:
            return await engine.run_in_pool(
                lambda: engine.engine.tools_grammar(req.tools, req.tool_choice, req.parallel_tool_calls))
        except ValueError as e:
            raise APIError(400, str(e), getattr(e, "param", "tools")) from None

    async def _submit(self, encoded, params: list[SamplingParams], stops: list[str],
                      grammar: Grammar | ToolGrammar | None = None) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for p in params:
                constraint = None if grammar is None else grammar.constraint()  # each choice its own matcher
                streams.append(await self.server.engine.submit(encoded, p, stops, constraint))
        except BaseException as e:
            for st in streams:
                st.abort()
            if isinstance(e, RequestError):
                raise APIError(400, str(e), "messages") from None
            if isinstance(e, EngineClosed) and engine_death(self.server.engine) is not None:
                raise self._engine_unavailable(e) from None
            if isinstance(e, (QueueFull, EngineClosed)):
                raise APIError(503, str(e), code="server_overloaded" if isinstance(e, QueueFull) else "shutting_down",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            if isinstance(e, EngineFault):
                raise APIError(500, str(e), code="internal_error") from None
            raise
        return streams

    def _engine_unavailable(self, error: BaseException) -> APIError:
        """The engine died (a dead tensor-parallel worker, a fault that ended its thread): nothing is
        shutting down, and the message names what stopped it."""
        return APIError(503, str(error), code="engine_unavailable")

    def _fault_error(self, error: EngineFault) -> APIError:
        if engine_death(self.server.engine) is not None:
            return self._engine_unavailable(error)
        return APIError(500, str(error), code="internal_error")

    def _logprobs(self, deltas_logprobs: list, stop_ids) -> list[dict]:
        tok = self.server.engine.engine.tokenizer.tekken
        out = []
        for lp in deltas_logprobs:
            if lp.token in stop_ids:
                continue
            out.append({**_token_entry(tok, lp.token, lp.logprob),
                        "top_logprobs": [_token_entry(tok, t, v) for t, v in lp.top]})
        return out

    async def _complete(self, request: Request, req: ChatRequest, streams: list[RequestStream], timers,
                        *answer_args):
        """The choices' whole answers, as _completion_json(req, streams, results, *answer_args)
        builds them (the chat's answer_args: its tool calls; a subclass's answer may take none)."""
        async def one(st: RequestStream, timer: ChoiceTimer):
            text, logprobs = [], []
            async for delta in st:
                timer.tokens(len(delta.token_ids))
                text.append(delta.text)
                logprobs += delta.logprobs
            timer.finish(st.finish_reason)
            return "".join(text), logprobs

        work = asyncio.gather(*(one(st, t) for st, t in zip(streams, timers)))
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:  # the client left: abort its sequences, answer nobody
                work.cancel()
                raise asyncio.CancelledError
            results = work.result()
        except EngineFault as e:
            raise self._fault_error(e) from None
        finally:
            watcher.cancel()
            for st in streams:
                if st.finish_reason is None:
                    st.abort()
        if any(st.finish_reason == "abort" for st in streams):
            raise cut_short()
        # n choices with top logprobs are megabytes of JSON: built off the event loop
        body = await asyncio.to_thread(self._completion_json, req, streams, results, *answer_args)
        return Response(body, media_type="application/json")

    def _completion_json(self, req: ChatRequest, streams: list[RequestStream], results: list,
                         calls: _CallReader) -> bytes:
        stop_ids = streams[0].stop_token_ids
        choices = []
        for i, ((text, lps), st) in enumerate(zip(results, streams)):
            made = calls.read(i, st)
            choices.append(wire.completion_choice(i, text, "tool_calls" if made else st.finish_reason,
                                                  self._logprobs(lps, stop_ids) if req.logprobs else None,
                                                  [c.to_openai() for c in made]))
        used = wire.usage(streams[0].prompt_tokens, sum(len(st.token_ids) for st in streams))
        body = wire.completion_body(wire.new_id(), wire.now(), self.server.settings.model_name, choices, used)
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    async def _sse(self, req: ChatRequest, streams: list[RequestStream], timers,
                   calls: _CallReader) -> AsyncIterator[bytes]:
        rid, created, model = wire.new_id(), wire.now(), self.server.settings.model_name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stop_ids = streams[0].stop_token_ids

        def event(choices: list[dict], usage_: dict | None = None) -> bytes:
            body = wire.chunk_body(rid, created, model, choices, include_usage, usage_)
            return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

        for i in range(len(streams)):
            yield event([wire.chunk_choice(i, {"role": "assistant", "content": ""},
                                           logprobs=None)])
        error: APIError | None = None
        try:
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                async for i, delta in merged:
                    timers[i].tokens(len(delta.token_ids))
                    logprobs = self._logprobs(delta.logprobs, stop_ids) if req.logprobs else None
                    held = calls.hold(i, delta)
                    if not held and (delta.text or logprobs):
                        yield event([wire.chunk_choice(i, {"content": delta.text}, logprobs=logprobs)])
                    if delta.finish_reason == "abort":  # not an OpenAI finish_reason: an error event
                        timers[i].finish("abort")
                        error = cut_short()
                        break
                    if delta.finish_reason is not None:
                        timers[i].finish(delta.finish_reason)
                        made = calls.read(i, streams[i]) if held else []
                        for k, call in enumerate(made):
                            yield event([wire.chunk_choice(i, wire.tool_call_delta(k, call.to_openai()))])
                        if held and not made and calls.held_text(i):  # cut short: the text as it came
                            yield event([wire.chunk_choice(i, {"content": calls.held_text(i)})])
                        yield event([wire.chunk_choice(i, {}, "tool_calls" if made else delta.finish_reason)])
        except EngineFault as e:
            error = self._fault_error(e)
        used = wire.usage(streams[0].prompt_tokens, sum(len(st.token_ids) for st in streams))
        for chunk in self._sse_end(error, event([], used) if include_usage else None):
            yield chunk

    def _sse_end(self, error: APIError | None, usage_event: bytes | None) -> list[bytes]:
        """A stream's last events: the error that cut it short (counted), else the usage chunk when
        one was asked for; then [DONE]."""
        if error is not None:
            self.server.metrics.errors.labels(str(error.status)).inc()
            return [b"data: " + json.dumps(error.body()).encode() + b"\n\n", b"data: [DONE]\n\n"]
        return [usage_event] * (usage_event is not None) + [b"data: [DONE]\n\n"]


class _CallReader:
    """The tool calls of a request's choices, read from their token ids once they finish
    (runtime/tool_calls.py); a stream holds back the text of a choice that starts with
    [TOOL_CALLS] (it is the calls' JSON, sent as tool_calls, not as content)."""

    def __init__(self, toolset: ToolGrammar | None, seeds: list[int | None]):
        self.toolset, self.seeds = toolset, seeds
        self._seen = [0] * len(seeds)               # tokens of each choice so far
        self._held: dict[int, list[str]] = {}       # choice -> its held-back text

    def hold(self, i: int, delta: Delta) -> bool:
        """Whether choice i's text is held back (it answers with calls)."""
        first = self._seen[i] == 0 and delta.token_ids
        self._seen[i] += len(delta.token_ids)
        if first and self.toolset is not None and delta.token_ids[0] == self.toolset.calls_token:
            self._held[i] = []
        if i in self._held:
            self._held[i].append(delta.text)
            return True
        return False

    def held_text(self, i: int) -> str:
        return "".join(self._held.get(i, []))

    def read(self, i: int, stream: RequestStream) -> list:
        if self.toolset is None or stream.finish_reason != "stop":
            return []
        return self.toolset.parse(stream.token_ids, stream.stop_token_ids, self.seeds[i])


def _parse(body: bytes, max_images: int | None) -> ChatRequest:
    return wire.parse_request(wire.parse_json(body), max_images)


def _text_bytes(messages: list) -> int:
    """UTF-8 bytes of the messages' text (string contents and text parts)."""
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else part
            if isinstance(text, str):
                total += len(text.encode("utf-8", errors="surrogatepass"))
    return total


def cut_short() -> APIError:
    """A request the engine ended before it finished: the server is shutting down (the grace
    period ran out) or its engine stopped. Not finish_reason 'length': it did not hit max_tokens."""
    return APIError(503, "the request was cut short before it finished: the server is shutting down",
                    code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})


def _token_entry(tok, token: int, logprob: float) -> dict:
    raw = tok.id_to_byte_piece(token, "keep")
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": wire.finite(logprob), "bytes": list(raw)}


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from all streams as they come; one stream is read directly."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, st: RequestStream):
        try:
            async for delta in st:
                await queue.put((i, delta, None))
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            await queue.put((i, None, e))
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                live -= 1
                continue
            yield i, delta
    finally:
        for t in tasks:
            t.cancel()


async def _client_gone(request: Request, every: float = 0.25) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every)


class SSEResponse(StreamingResponse):
    """An event stream whose sequences are aborted however it ends (done, client gone, server
    shutting down), so that no KV block outlives its client."""

    def __init__(self, content, streams: list[RequestStream], timers: list[ChoiceTimer]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._streams, self._timers = streams, timers

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for st, timer in zip(self._streams, self._timers):
                if st.finish_reason in (None, "abort"):
                    st.abort()
                if not timer.done:
                    timer.finish("abort")
            await self.body_iterator.aclose()
