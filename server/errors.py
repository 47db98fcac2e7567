"""Errors as the OpenAI API reports them: a status code and {"error": {message, type, param, code}}."""

from __future__ import annotations

from http import HTTPStatus

from esp_engine.errors import ContextLengthError, InvalidRequestError, InvalidSpecConfigError

from .async_engine import EngineDeadError
from .protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _default_type(status)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error" if status != 503 else "service_unavailable"
    return "invalid_request_error"


def from_exception(exc: BaseException, prompt_param: str = "prompt") -> APIError:
    """Map an engine or server exception to the error a client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, InvalidSpecConfigError):
        return APIError(400, str(exc), param="spec_method", code="invalid_spec_config")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_request")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    return APIError(500, f"internal error during generation: {type(exc).__name__}: {exc}", code="internal_error")


def model_not_found(name: str | None) -> APIError:
    return APIError(404, f"the model {name!r} does not exist", type_="invalid_request_error", param="model",
                    code="model_not_found")


def not_ready() -> APIError:
    return APIError(503, "the model is still loading; retry shortly", code="model_loading")


def http_error(status: int, detail: str | None = None) -> APIError:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return APIError(status, detail or phrase)
