"""The FastAPI app: routes, API key, OpenAI-style errors for everything (FastAPI's 422 and
Starlette's HTML-less 404/405 included), and a 500 with a message for a real fault, after which
the server goes on serving on the same connection."""
from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from pixtral_fast.runtime.async_engine import AsyncEngine
from pixtral_fast.serve import protocol as wire
from pixtral_fast.serve.chat import ChatHandler
from pixtral_fast.serve.completions import CompletionsHandler
from pixtral_fast.serve.media import MediaLimits, media_client
from pixtral_fast.serve.metrics import ServerMetrics, engine_problem
from pixtral_fast.serve.protocol import APIError

log = logging.getLogger("pixtral_fast.serve")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 32 << 20
    media: MediaLimits = field(default_factory=MediaLimits)
    shutdown_grace: float = 10.0
    body_read_timeout: float = 30.0           # seconds for the whole request body to arrive
    max_prompt_tokens: int | None = None      # prompt tokens x n one request may prefill; None: no bound

    def check_prompt_tokens(self, prompt_tokens: int, n: int, at_least: bool = False) -> None:
        """Refuses, before any prefill, a request whose n choices would prefill more prompt tokens
        than max_prompt_tokens: one such request would hold the engine for all its prefill steps.
        at_least: prompt_tokens is a lower bound (from the text's size, before tokenizing)."""
        bound = self.max_prompt_tokens
        if bound is None or prompt_tokens * n <= bound:
            return
        has = f"at least {prompt_tokens}" if at_least else f"{prompt_tokens}"
        if n == 1 or prompt_tokens > bound:
            raise APIError(400, f"messages: the prompt has {has} tokens; at most {bound} prompt tokens "
                                "per request are allowed (--max-prompt-tokens)", "messages", "prompt_too_long")
        raise APIError(400, f"n: {n} choices of a prompt of {has} tokens prefill {prompt_tokens * n} tokens; "
                            f"at most {bound} prompt tokens per request are allowed (--max-prompt-tokens), "
                            f"so n may be at most {bound // prompt_tokens} here", "n", "prompt_too_long")


@dataclass
class ServerState:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    http: httpx.AsyncClient | None = None
    created: int = field(default_factory=wire.now)
    stopping: bool = False                    # shutdown has begun: in-flight requests get their grace
    stopped: asyncio.Event = field(default_factory=asyncio.Event)  # the engine is closed

    async def stop_engine(self, grace: float) -> None:
        """Gives in-flight requests `grace` seconds, then closes the engine. Requests not yet
        answered then (a slow image fetch, say) get the 503 `shutting_down` of RequestGuard."""
        self.stopping = True
        try:
            await self.engine.aclose(grace)
        finally:
            self.stopped.set()

    def error_response(self, error: APIError) -> JSONResponse:
        self.metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: the request was not answered before its engine stopped",
                    code="shutting_down", headers={"Retry-After": "1"})


class RequestGuard:
    """Pure ASGI, around the app's routes and handlers:
    - a fault answers a JSON 500 here, and nothing reaches Starlette's ServerErrorMiddleware,
      which would answer and then re-raise, so that uvicorn closed the keep-alive connection;
    - a request not yet answered when the engine stops (one still fetching its images, say)
      is ended with the 503 `shutting_down` that a request the engine cut short gets."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _TrackedSend(send)
        try:
            await self._until_stopped(self.app(scope, receive, response), response)
        except asyncio.CancelledError:  # uvicorn's graceful shutdown ran out of time
            if response.started or not self.state.stopping:
                raise
            await response.answer(self.state.error_response(shutting_down()))
        except _Stopped:
            await response.answer(self.state.error_response(shutting_down()))
        except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing went wrong
            log.info("client disconnected before sending all of %s %s", scope.get("method"), scope.get("path"))
        except Exception as error:
            log.error("internal error on %s %s", scope.get("method"), scope.get("path"), exc_info=error)
            if response.complete:  # the answer is out whole: the connection goes on
                return
            if response.started:  # half an answer is out: only closing the connection ends it
                raise
            await response.answer(self.state.error_response(
                shutting_down() if self.state.stopping else internal_error(error)))

    async def _until_stopped(self, handling, response: "_TrackedSend") -> None:
        task = asyncio.ensure_future(handling)
        stopped = asyncio.ensure_future(self.state.stopped.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not response.started:  # a started answer (a stream) ends by itself
                task.cancel()
                await asyncio.wait({task})
                if not response.started:
                    raise _Stopped
            await task
        finally:
            stopped.cancel()
            task.cancel()  # a no-op once it is done; else we were cancelled, and so is the request


class _Stopped(Exception):
    """The engine stopped before this request began its answer."""


class _TrackedSend:
    """The ASGI `send` of one request, knowing whether the answer has begun, and ended."""

    def __init__(self, send):
        self._send, self.started, self.complete = send, False, False

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True

    async def answer(self, response: Response) -> None:
        async def nothing_more():
            return {"type": "http.disconnect"}
        await response({"type": "http"}, nothing_more, self)


def internal_error(error: Exception) -> APIError:
    return APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error")


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The app over a started or not yet started AsyncEngine (the app's lifespan starts it and,
    at exit, stops it)."""
    state = ServerState(engine, settings, ServerMetrics(engine))
    chat = ChatHandler(state)
    completions = CompletionsHandler(state)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        state.http = media_client()
        try:
            yield
        finally:
            await state.http.aclose()
            await state.stop_engine(grace=0.0)  # uvicorn already gave in-flight requests their grace

    # redirect_slashes=False: /v1/chat/completions/ is a JSON 404, not a bare 307 a client may not follow
    app = FastAPI(title="pixtral-fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.server = state
    app.add_middleware(RequestGuard, state=state)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> Response:
        problem = engine_problem(engine) or (None if engine.alive else "the engine is not running")
        if problem is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse(APIError(503, problem, code="engine_unavailable").body(), status_code=503)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse(wire.models_body(settings.model_name, state.created, engine.engine.max_model_len))

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        return await chat(request)

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        authorize(request)
        return await completions(request)

    error_response = state.error_response

    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, error: APIError) -> Response:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, error: RequestValidationError) -> Response:
        return error_response(wire.validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, error: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, str(error.detail), code=code,
                                       headers=dict(error.headers or {})))

    return app
