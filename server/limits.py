"""Input limits applied before a request costs anything: body size, strict JSON, prompt length.

A body is measured while it is received, so an oversized one is refused (413) without being
held or parsed; JSON is parsed strictly (no NaN or Infinity, which Python's parser accepts but
JSON does not), and a prompt that cannot possibly fit the context is refused before the
tokenizer sees it.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`: at once from Content-Length, else as it arrives.

    The body is buffered here (never more than the limit) and replayed to the app, so no route
    can start parsing a body that later turns out too large."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_error: Any) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._on_error = on_error  # (scope, APIError) -> Response, so the refusal is counted like any error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body only a disconnect can come

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                              "(--max-request-bytes)", code="request_too_large")
        response = self._on_error(scope, error)
        response.headers["Connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"the number {text} is out of range; numbers must be finite")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: Any) -> None:
    """Refuse strings holding an unpaired UTF-16 surrogate: JSON's escapes can spell one
    (a "\\ud800" alone), but it is no Unicode character and the tokenizer cannot encode it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise ValueError("a string holds an unpaired UTF-16 surrogate, which is not valid Unicode")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def strict_json_loads(body: bytes) -> Any:
    """json.loads without NaN, Infinity, numbers that overflow to infinity or lone surrogates."""
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
        _check_text(value)
        return value
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:  # also a huge integer literal or absurd nesting
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        raise json.JSONDecodeError(str(exc), text, 0) from exc


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `strict_json_loads` (FastAPI's parse errors become 400s)."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Any:
            return await handler(_StrictJSONRequest(request.scope, request.receive, request._send))

        return strict_handler


# ---- prompt length before tokenizing --------------------------------------------------------


@lru_cache(maxsize=8)
def _longest_token_chars(tokenizer: Any) -> int:
    ids = list(range(len(tokenizer)))
    longest = max((len(t) for t in tokenizer.convert_ids_to_tokens(ids) if t), default=1)
    # Byte-level vocabularies spell each byte as one character, so their entries are never
    # shorter than the text they stand for; a SentencePiece entry is its text.
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    # A normalizer may compose characters (NFC joins up to three into one) before tokenizing.
    return longest * (4 if normalizer is not None else 1)


def prompt_char_limit(tokenizer: Any, max_model_len: int) -> int:
    """The most characters a text can have and still encode to at most `max_model_len` tokens.

    No token covers more characters than the longest vocabulary entry, so a longer text needs
    more tokens than the context holds, whatever it says."""
    return max_model_len * _longest_token_chars(tokenizer)


def check_prompt_chars(chars: int, tokenizer: Any, max_model_len: int, param: str) -> None:
    limit = prompt_char_limit(tokenizer, max_model_len)
    if chars > limit:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; the prompt has {chars} "
                            f"characters, more than any {max_model_len} tokens can spell (at most {limit})",
                       param=param, code="context_length_exceeded")

