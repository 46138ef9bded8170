"""The FastAPI app: routes, API key, OpenAI-style errors for everything (FastAPI's 422 and
Starlette's HTML-less 404/405 included), and a 500 with a message for a real fault, after which
the server goes on serving."""
from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from pixtral_fast.runtime.async_engine import AsyncEngine
from pixtral_fast.serve import protocol as wire
from pixtral_fast.serve.chat import ChatHandler
from pixtral_fast.serve.media import MediaLimits
from pixtral_fast.serve.metrics import ServerMetrics
from pixtral_fast.serve.protocol import APIError

log = logging.getLogger("pixtral_fast.serve")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 32 << 20
    media: MediaLimits = field(default_factory=MediaLimits)
    shutdown_grace: float = 10.0


@dataclass
class ServerState:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    http: httpx.AsyncClient | None = None
    created: int = field(default_factory=wire.now)


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The app over a started or not yet started AsyncEngine (the app's lifespan starts it and,
    at exit, stops it)."""
    state = ServerState(engine, settings, ServerMetrics(engine))
    chat = ChatHandler(state)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        state.http = httpx.AsyncClient(follow_redirects=True, max_redirects=5)
        try:
            yield
        finally:
            await state.http.aclose()
            await engine.aclose(grace=0.0)  # uvicorn already gave in-flight requests their grace

    app = FastAPI(title="pixtral-fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

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
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse(APIError(503, "the engine is not running").body(), status_code=503)

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

    def error_response(error: APIError) -> JSONResponse:
        state.metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

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

    @app.exception_handler(Exception)
    async def on_fault(request: Request, error: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}",
                                       code="internal_error"))

    return app
