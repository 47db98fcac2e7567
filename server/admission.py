"""Admission control and draining, counted in the server layer.

`Admission.outstanding` is the number of engine requests (one per choice and prompt) that were
added to the engine and have not yet finished or been aborted. Once it would pass the running
cap plus `max_waiting_requests`, new work is refused at once with 429 and `Retry-After`, rather
than queued without bound. After a shutdown signal (`begin_drain`) new work gets 503 while the
requests already in flight finish; `DrainGate` counts those at the HTTP level, so a drain also
waits for a response that is still being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError

DEFAULT_MAX_WAITING_REQUESTS = 512
RETRY_AFTER_S = 1
# Probes and scrapes keep working while a server drains: they are how it is watched leaving.
_UNGATED_PATHS = ("/health", "/ready", "/metrics")


class Ticket:
    """A claim on `n` outstanding engine requests; `release` is idempotent."""

    def __init__(self, admission: "Admission", n: int) -> None:
        self._admission = admission
        self.n = n

    def release(self) -> None:
        if self.n:
            self._admission.outstanding -= self.n
            self.n = 0


@dataclass
class Readiness:
    ready: bool
    status: str  # ready, loading, load_failed, engine_unavailable, saturated, draining
    message: str


class Admission:
    """State shared by the handlers (on the event loop) and the process's signal handling."""

    def __init__(self, max_running: int, max_waiting: int, metrics: Any = None) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.outstanding = 0
        self.in_flight = 0  # HTTP requests for work (not probes) being answered
        self.draining = False

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_waiting

    @property
    def saturated(self) -> bool:
        return self.outstanding >= self.capacity

    def acquire(self, n: int) -> Ticket:
        """Claim `n` engine requests or raise 429 (saturated) / 503 (draining).

        An idle server admits any request, so one asking for more choices than the whole
        capacity is still served rather than refused forever."""
        if self.draining:
            raise self._refusal("draining", shutting_down())
        if self.outstanding and self.outstanding + n > self.capacity:
            raise self._refusal("saturated", APIError(
                429, f"the server is at capacity ({self.outstanding} requests running or waiting, limit "
                     f"{self.capacity}); retry after {RETRY_AFTER_S} s", code="server_saturated", headers={"Retry-After": str(RETRY_AFTER_S)}))
        self.outstanding += n
        return Ticket(self, n)

    def begin_drain(self) -> None:
        self.draining = True

    def _refusal(self, reason: str, error: APIError) -> APIError:
        if self.metrics is not None and self.metrics.model_name:
            self.metrics.requests_rejected.labels(self.metrics.model_name, reason).inc()
        return error

    def readiness(self, engine: Any, load_error: BaseException | None) -> Readiness:
        if self.draining:
            return Readiness(False, "draining", "the server is shutting down")
        if load_error is not None:
            return Readiness(False, "load_failed", f"the model failed to load: {load_error}")
        if engine is None:
            return Readiness(False, "loading", "the model is still loading")
        if not engine.is_alive:
            return Readiness(False, "engine_unavailable", "the engine worker has stopped")
        if self.saturated:
            return Readiness(False, "saturated", f"{self.outstanding} requests running or waiting, limit "
                                                 f"{self.capacity}")
        return Readiness(True, "ready", "ready to take requests")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica", code="shutting_down",
                    headers={"Connection": "close"})


class DrainGate:
    """Counts the work requests in flight; once draining, answers new ones 503."""

    def __init__(self, app: ASGIApp, admission: Admission, on_error: Any) -> None:
        self.app = app
        self.admission = admission
        self._on_error = on_error  # (scope, APIError) -> Response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        admission = self.admission
        if admission.draining:
            await self._on_error(scope, admission._refusal("draining", shutting_down()))(scope, receive, send)
            return
        admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            admission.in_flight -= 1
