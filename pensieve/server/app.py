"""The OpenAI-compatible HTTP API (FastAPI) over a Generator (pensieve/api.py) whose engine runs on a thread of its
own (DESIGN §9).

The app only assembles: the middleware (API key, body size, metrics), the error handlers (OpenAI's error shape), and
one router per API — chat completions (pensieve/server/chat.py), completions (completions.py), responses
(responses.py), conversations (conversations.py), models, health and metrics (models.py), the chat page at `/`
(page.py) — over the state they share
(common.py: `ServerState`) and the threads that map stored responses to pensieve conversations (threads.py).

Chat templating and detokenization run off the engine's thread (a worker thread and the event loop); the engine
thread only schedules, steps and samples.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from pensieve.api import Generator
from pensieve.server import chat, completions, conversations, models, page, responses, tokens
from pensieve.server.common import APIError, ClientGone, ServerConfig, ServerState, error_response
from pensieve.server.store import Store

__all__ = ["ServerConfig", "create_app"]


def create_app(gen: Generator, tokenizer, store: Store | None = None, config: ServerConfig | None = None) -> FastAPI:
    """The API over `gen` (a Generator whose engine a thread drives: `gen.serve`)."""
    s = ServerState(gen, tokenizer, store or Store(), config or ServerConfig())
    # /openapi.json is served; Swagger UI and ReDoc are not (they load their assets from a CDN)
    app = FastAPI(title="pensieve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.pensieve = s
    _guard(app, s)
    _error_handlers(app)
    routers = (models.router, chat.router, completions.router, responses.router, conversations.router, tokens.router)
    for router in routers:
        app.include_router(router)
    app.include_router(page.router())
    return app


def _guard(app: FastAPI, s: ServerState) -> None:
    """Every request: the API key (all but /health and the chat page's files), the body size, and its count in the
    metrics."""
    config, metrics = s.config, s.metrics
    expected = f"Bearer {config.api_key}".encode() if config.api_key else None
    too_big = f"request body over {config.max_body_bytes} bytes"

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        endpoint = _endpoint(path)
        if expected is not None and path != "/health" and not page.public(request.method, path):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                metrics.request(endpoint, 401)
                return error_response(
                    401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error"
                )
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            metrics.request(endpoint, 413)
            return error_response(413, too_big)
        if request.method == "POST":
            body = await request.body()  # read once, bounded (chunked bodies have no content-length)
            if len(body) > config.max_body_bytes:
                metrics.request(endpoint, 413)
                return error_response(413, too_big)
        response = await call_next(request)
        metrics.request(endpoint, response.status_code)
        return response


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError):
        return error_response(error.status, error.message, error.type, error.param)

    @app.exception_handler(ClientGone)
    async def client_gone(_request: Request, _gone: ClientGone):
        return error_response(499, "the client closed the request; its turn was aborted")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        what = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":  # a field this endpoint does not take
            what = "not supported by this server (docs/serving.md lists every field and what it does)"
        loc = first.get("loc", ())
        param = loc[1] if len(loc) > 1 and isinstance(loc[1], str) else None
        return error_response(400, f"{where}: {what}" if where else "invalid request body", param=param)


def _endpoint(path: str) -> str:
    """A bounded label for metrics: the route, ids replaced."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[1] in ("responses", "conversations", "models"):
        parts[2] = "{id}"
        if len(parts) >= 5:
            parts[4] = "{id}"
    label = "/" + "/".join(parts[:5])
    known = (
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/conversations",
    )
    return label if label.startswith(known) else "other"
