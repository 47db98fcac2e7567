"""The FastAPI application: routes, OpenAI-style errors, API-key check and model loading.

The model loads in a background thread started by the lifespan, so the HTTP server answers
(503) while it loads. All state lives in `app.state`: the engine handle once loaded, the
settings and the metrics registry.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from esp_engine.config import SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.scheduler import SchedulerConfig
from esp_engine.errors import EngineError
from esp_engine.loader import LoadedModel, load_model

from .admission import DEFAULT_MAX_WAITING_REQUESTS, Admission, DrainGate
from .async_engine import AsyncEngine
from .errors import APIError, from_exception, http_error, not_ready
from .limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimitMiddleware, StrictJSONRoute
from .metrics import CONTENT_TYPE, Metrics
from .openapi import document_errors, responses
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    HealthResponse,
    ModelCard,
    ModelList,
    ReadinessResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from .serving import (
    ClientDisconnected,
    Context,
    SSEStream,
    chat_prompt_ids,
    check_model,
    create_chat_completion,
    create_completion,
)

log = logging.getLogger("server")

# Routes that need the key when one is set; /health and /metrics stay open for probes and scrapers.
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class ServerSettings:
    model: str = "smollm2-135m-instruct"
    method: str = "hybrid"  # the best tau in every Spec-Bench category (docs/benchmarks.md)
    preset: str = "bc30"
    dtype: str | None = None
    quantization: str = "none"  # int8/int4/w8a8 linears (esp_engine/quantization.py)
    device: str | None = None
    max_model_len: int | None = None
    api_key: str | None = None
    served_model_name: str | None = None
    # Limits: request bodies (413 beyond), engine requests queued beyond the running cap (429
    # beyond), and how long a shutdown signal waits for requests in flight.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    shutdown_timeout: float = 30.0
    # One engine step running longer than this is a hang: /health turns 503 so the liveness probe restarts us.
    engine_step_timeout: float = 300.0
    # Decode steps padded into captured CUDA graphs on a GPU unless this is set (vLLM's --enforce-eager).
    enforce_eager: bool = False
    # Batching and KV memory; speculation adapts to load and prompt prefixes are cached unless told otherwise.
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(load_adaptive=True,
                                                                                enable_prefix_caching=True))

    def spec(self) -> SpecConfig:
        return SpecConfig.from_preset(self.method, self.preset)


def build_app(
    settings: ServerSettings | None = None,
    *,
    loader: Callable[[], LoadedModel] | None = None,
    on_ready: Callable[[LoadedModel], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app that loads its model (with `loader`, default `load_model(settings...)`) at startup."""
    settings = settings or ServerSettings()
    default_spec = settings.spec()  # refuse a bad --method/--preset before anything starts
    load = loader or (lambda: load_model(settings.model, device=settings.device, dtype=settings.dtype,
                                         max_model_len=settings.max_model_len,
                                         quantization=settings.quantization))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        closing = threading.Event()

        def load_in_background() -> None:
            try:
                t0 = time.perf_counter()
                log.info("loading model %s (dtype %s, quantization %s)", settings.model, settings.dtype or "default",
                         settings.quantization)
                loaded = load()
                if closing.is_set():
                    return
                app.state.metrics.bind(settings.served_model_name or loaded.name)
                engine = AsyncEngine(LLMEngine(loaded, default_spec, settings.scheduler,
                                               runner="plain" if settings.enforce_eager else "auto"),
                                     app.state.metrics)
                engine.start()
                app.state.engine = engine
                log.info("model %s ready in %.1fs (%s, quantization %s; speculation: %s %s)", loaded.name,
                         time.perf_counter() - t0, str(loaded.dtype).removeprefix("torch."),
                         getattr(loaded, "quantization", "none"), default_spec.method,
                         settings.preset if default_spec.is_speculative else "")
            except BaseException as exc:
                log.exception("model loading failed")
                app.state.load_error = exc
                if on_error:
                    on_error(exc)
                return
            if on_ready:
                on_ready(loaded)

        threading.Thread(target=load_in_background, name="esp-model-loader", daemon=True).start()
        try:
            yield
        finally:
            closing.set()
            engine = app.state.engine
            if engine is not None:
                engine.shutdown()

    app = FastAPI(title="esp-serve", lifespan=lifespan)
    app.router.route_class = StrictJSONRoute
    app.state.settings = settings
    app.state.engine = None
    app.state.load_error = None
    app.state.metrics = Metrics()
    app.state.admission = Admission(settings.scheduler.max_num_seqs, settings.max_waiting_requests,
                                    app.state.metrics)
    # Added innermost first: the key is checked before anything, then draining, then the body size.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, on_error=_scope_error)
    app.add_middleware(DrainGate, admission=app.state.admission, on_error=_scope_error)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    _add_error_handlers(app)
    _add_routes(app)
    document_errors(app)
    return app


def _context(request: Request) -> Context:
    state = request.app.state
    if state.engine is None:
        if state.load_error is not None:
            raise APIError(503, f"the model failed to load: {state.load_error}", code="model_load_failed")
        raise not_ready()
    name = state.settings.served_model_name or state.engine.loaded.name
    return Context(state.engine, name, state.metrics, state.admission)


def _add_routes(app: FastAPI) -> None:
    @app.get("/health", responses=responses(503, ok=HealthResponse))
    async def health(request: Request) -> dict:
        ctx = _context(request)
        reason = ctx.engine.liveness(request.app.state.settings.engine_step_timeout)
        if reason is not None:
            raise APIError(503, reason, code="engine_unavailable")
        return {"status": "ok"}

    @app.get("/ready", response_model=ReadinessResponse,
             responses={**responses(ok=ReadinessResponse),
                        503: {"model": ReadinessResponse, "description": "Not ready: loading, saturated or draining"}})
    async def ready(request: Request) -> JSONResponse:
        state = request.app.state
        admission: Admission = state.admission
        verdict = admission.readiness(state.engine, state.load_error)
        body = ReadinessResponse(status=verdict.status, message=verdict.message, outstanding=admission.outstanding,
                                 capacity=admission.capacity)
        if not verdict.ready:
            body.error = ErrorInfo(message=verdict.message, type="service_unavailable", code=verdict.status)
        return JSONResponse(body.model_dump(), status_code=200 if verdict.ready else 503)

    @app.get("/metrics", response_class=Response,
             responses={**responses(), 200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                                             "description": "Prometheus text format"}})
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses=responses(401, 503, ok=ModelList))
    async def models(request: Request) -> dict:
        ctx = _context(request)
        card = ModelCard(id=ctx.served_model_name, root=ctx.engine.loaded.source, max_model_len=ctx.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/completions", responses=responses(400, 401, 404, 413, 429, 503, ok=CompletionResponse,
                                                      stream=True))
    async def completions(body: CompletionRequest, request: Request) -> Any:
        ctx = _context(request)
        ctx.metrics.requests_received.labels(ctx.served_model_name, "completions").inc()
        return _respond(await create_completion(ctx, body, request))

    @app.post("/v1/chat/completions", responses=responses(400, 401, 404, 413, 429, 503, ok=ChatCompletionResponse,
                                                           stream=True))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        ctx = _context(request)
        ctx.metrics.requests_received.labels(ctx.served_model_name, "chat_completions").inc()
        return _respond(await create_chat_completion(ctx, body, request))

    @app.post("/tokenize", responses=responses(400, 401, 404, 413, 503, ok=TokenizeResponse))
    async def tokenize(body: TokenizeRequest, request: Request) -> dict:
        ctx = _context(request)
        check_model(ctx, body.model)
        if body.messages is not None:
            ids = chat_prompt_ids(ctx.tokenizer, body.messages, body.add_generation_prompt)
        else:
            ids = list(ctx.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.max_model_len).model_dump()

    @app.post("/detokenize", responses=responses(400, 401, 404, 413, 503, ok=DetokenizeResponse))
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
        ctx = _context(request)
        check_model(ctx, body.model)
        vocab = len(ctx.tokenizer)
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens)).model_dump()


class _SSEResponse(EventSourceResponse):
    """An SSE response that frees its engine requests however it ends (the client may leave
    before the stream produced its first event, when the event generator never ran)."""

    def __init__(self, stream: SSEStream) -> None:
        super().__init__(stream.events(), sep="\n")
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


def _respond(result: dict | SSEStream) -> Any:
    if isinstance(result, dict):
        return JSONResponse(result)
    return _SSEResponse(result)


def _error_response(app: Any, error: APIError) -> JSONResponse:
    metrics: Metrics = app.state.metrics
    if metrics.model_name:  # errors before the model is bound (503 while loading) have no model label
        metrics.request_errors.labels(metrics.model_name, str(error.status)).inc()
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)


def _scope_error(scope: Scope, error: APIError) -> JSONResponse:
    return _error_response(scope["app"], error)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
    param = ".".join(loc) or None
    return (f"{param}: {message}" if param else message), param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(request.app, exc)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _error_response(request.app, from_exception(exc))

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; ends the handler without a 500 in the log

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(request.app, APIError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else None
        error = http_error(exc.status_code, detail)
        error.headers = dict(exc.headers) if exc.headers else None  # 405 carries Allow
        return _error_response(request.app, error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error for %s %s", request.method, request.url.path)
        return _error_response(request.app, from_exception(exc))


class ApiKeyMiddleware:
    """Bearer-token check in front of the API routes (plain ASGI, so streams pass untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(_PROTECTED_PREFIXES):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 type_="invalid_request_error", code="invalid_api_key")
                await _error_response(scope["app"], error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
