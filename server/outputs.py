"""One choice's engine outputs turned into text deltas, token details and a finish reason.

Tokens are detokenized one at a time, so every token knows where its text starts (for
logprob offsets) and a stop string is caught at the exact token that completes it: the
tokens after it are dropped from the text and the usage, whatever the speculative method
committed in the same pass, so results do not depend on the method.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from .async_engine import RequestStream
from .detokenizer import IncrementalDetokenizer, StopStringMatcher

T = TypeVar("T")


@dataclass(slots=True)
class TokenInfo:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]
    text_offset: int


@dataclass(slots=True)
class ChoiceDelta:
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0  # cumulative, for usage
    prompt_logprobs: list[dict | None] | None = None  # the engine's prompt entries, on the first delta


class ChoiceRun:
    def __init__(self, index: int, stream: RequestStream, tokenizer: Any, prompt_ids: Sequence[int],
                 stops: Sequence[str], on_finish: Callable[[str], None] | None = None) -> None:
        self.index = index
        self._on_finish = on_finish
        self.stream = stream
        self.prompt_ids = list(prompt_ids)
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopStringMatcher(stops)
        self._raw_len = 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens the prefix cache served (usage.prompt_tokens_details)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        async for out in self.stream:
            self.cached_tokens = out.num_cached_tokens
            parts: list[str] = []
            tokens: list[TokenInfo] = []
            logprobs = out.new_logprobs or []
            finish: str | None = None
            for i, token in enumerate(out.new_token_ids):
                self.completion_tokens += 1
                lp = logprobs[i] if i < len(logprobs) else None
                tokens.append(TokenInfo(token, lp["logprob"] if lp else None, list(lp["top"]) if lp else [],
                                        self._raw_len))
                piece = self._detok.push(token)
                self._raw_len += len(piece)
                parts.append(self._stops.feed(piece))
                if self._stops.stopped:
                    self.stream.abort("stop_string")
                    finish = "stop"
                    break
            if finish is None and out.finished:
                if out.stop_token_id is not None:  # generated and counted, though its text is not shown
                    self.completion_tokens += 1
                    if len(logprobs) > len(out.new_token_ids):  # asked for: it is scored like any other
                        lp = logprobs[len(out.new_token_ids)]
                        tokens.append(TokenInfo(out.stop_token_id, lp["logprob"], list(lp["top"]), self._raw_len))
                tail = self._detok.flush()
                self._raw_len += len(tail)
                parts.append(self._stops.feed(tail))
                parts.append(self._stops.flush())
                finish = "stop" if self._stops.stopped else (out.finish_reason or "stop")
            if finish is not None and self._on_finish:
                self._on_finish(finish)
            yield ChoiceDelta("".join(parts), tokens, finish, self.completion_tokens, out.prompt_logprobs)
            if finish is not None:
                return


async def merge(iterators: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive, tagging each with its position."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    done = object()
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                queue.put_nowait((i, item))
        except Exception as exc:  # forwarded so the consumer raises it
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:  # cancelling closes each iterator, whose cleanup aborts its request
            task.cancel()


# ---- token strings --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes of one token (a byte-level token may hold part of a UTF-8 character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = _byte_decoder()
    if isinstance(piece, str) and piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def token_string(raw: bytes) -> str:
    """Display form: the text, or OpenAI's `bytes:\\xNN` form when it is not valid UTF-8 alone."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
