"""The OpenAPI document describes every answer a route can give, errors included.

Every error is OpenAI's `{"error": {...}}`, so each operation lists its error statuses with that
schema; FastAPI's 422 is dropped because validation errors are answered with 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .protocol import ErrorResponse

_WHEN = {
    400: "Invalid request: malformed JSON, a wrong or out-of-range field, a prompt beyond the context",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model",
    413: "Request body larger than --max-request-bytes",
    429: "At capacity: running plus waiting requests at their limit; retry after Retry-After seconds",
    500: "The server failed while answering",
    503: "The model is loading or failed to load, the engine stopped, or the server is shutting down",
}
# One Server-Sent Event, as OpenAPI 3.1 describes a stream's items: `data` is a JSON chunk of the
# operation's stream (or an error body), the last one is [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                             "retry": {"type": "integer"}}}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}


def responses(*statuses: int, ok: type[BaseModel] | None = None, stream: bool = False) -> dict[int | str, Any]:
    """The `responses=` of a route: its error statuses (500 always) and, optionally, its 200 body."""
    out: dict[int | str, Any] = {}
    for status in sorted({*statuses, 500}):
        out[status] = {"model": ErrorResponse, "description": _WHEN[status]}
        if status == 429:
            out[status]["headers"] = _RETRY_AFTER
    if ok is not None:
        out[200] = {"model": ok, "description": "Successful response"}
        if stream:
            out[200]["description"] = "The response; with \"stream\": true, Server-Sent Events ending in [DONE]"
            out[200]["content"] = {"text/event-stream": {"schema": _SSE_EVENT}}
    return out


def document_errors(app: FastAPI) -> None:
    """Build the schema once without FastAPI's 422 (never sent: validation errors are 400)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
