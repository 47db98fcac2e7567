"""/v1/completions and /v1/chat/completions: requests to engine requests, outputs to OpenAI bodies.

Everything that can be refused (model name, sampling values, speculative settings, prompt
length) is checked and the engine requests are queued before a response starts, so a bad
request gets a proper status code even when it asked for a stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from esp_engine.chat import render_chat
from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.errors import ContextLengthError, EngineError, InvalidRequestError

from .admission import Admission, Ticket
from .async_engine import AsyncEngine, EngineDeadError
from .detokenizer import IncrementalDetokenizer
from .errors import APIError, from_exception, model_not_found
from .limits import check_prompt_chars
from .metrics import Metrics
from .outputs import ChoiceDelta, ChoiceRun, TokenInfo, merge, token_bytes, token_string
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
    _SamplingFields,
    random_id,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SPEC_OFF = ("ar", "off", "none")


class ClientDisconnected(Exception):
    pass


@dataclass
class Context:
    """What the handlers need from the app: the engine handle and the name it is served under."""

    engine: AsyncEngine
    served_model_name: str
    metrics: Metrics
    admission: Admission

    def count_finish(self, reason: str) -> None:
        self.metrics.request_success.labels(self.served_model_name, reason).inc()

    @property
    def tokenizer(self) -> Any:
        return self.engine.loaded.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.loaded.max_model_len


# ---- request preparation -----------------------------------------------------------------


def check_model(ctx: Context, name: str | None) -> None:
    if name is not None and name != ctx.served_model_name:
        raise model_not_found(name)


def resolve_spec(method: str | None, preset: str | None, default: SpecConfig) -> SpecConfig | None:
    """The per-request speculative settings; None keeps the server default."""
    if method is None and preset is None:
        return None
    name = (method or default.method).strip().lower()
    if name in SPEC_OFF:
        return SpecConfig.from_preset("ar")
    if name == default.method and preset is None:
        return None
    return SpecConfig.from_preset(name, preset)


def resolve_max_tokens(requested: int | None, prompt_len: int, limit: int, default_cap: int | None) -> int:
    if requested == 0:
        return 0  # scoring the prompt only; the engine checks the prompt fits the context
    room = limit - prompt_len
    if room <= 0:
        raise ContextLengthError(
            f"this model's maximum context length is {limit} tokens; the prompt has {prompt_len}, "
            "leaving no room for a completion"
        )
    if requested is None:
        return min(room, default_cap) if default_cap else room
    return requested  # the engine refuses it with a context-length error if it does not fit


def sampling_params(req: _SamplingFields, max_new_tokens: int, logprobs: int | None, index: int,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    # Each of n choices gets its own seed so they differ, yet a seeded request stays repeatable.
    seed = None if req.seed is None else req.seed + index
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=seed,
        max_new_tokens=max_new_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    try:
        return render_chat(tokenizer, conversation, add_generation_prompt)
    except Exception as exc:  # jinja raises for conversations the template refuses
        raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from exc


async def _start(ctx: Context, req: _SamplingFields, prompts: list[list[int]], max_tokens: int | None,
                 default_cap: int | None, logprobs: int | None, prompt_param: str, meta: dict,
                 endpoint: str, prompt_logprobs: int | None = None,
                 param_names: dict[str | None, str] | None = None) -> tuple[list[ChoiceRun], Ticket]:
    """Queue the engine requests; the ticket holds their place in admission until released."""
    param_names = param_names or {}
    try:
        spec = resolve_spec(req.spec_method, req.spec_preset, ctx.engine.default_spec)
        requests = []
        for ids in prompts:
            if not ids:
                raise InvalidRequestError("the prompt is empty: give at least one token")
            max_new = resolve_max_tokens(max_tokens, len(ids), ctx.max_model_len, default_cap)
            requests += [(ids, sampling_params(req, max_new, logprobs, j, prompt_logprobs), spec) for j in range(req.n)]
        ticket = ctx.admission.acquire(len(requests))
        try:
            streams = await ctx.engine.add_requests(requests, request_id=meta["id"], endpoint=endpoint)
        except BaseException:
            ticket.release()
            raise
    except (EngineError, EngineDeadError) as exc:
        error = from_exception(exc, prompt_param)
        error.param = param_names.get(error.param, error.param)  # the engine's names are the completions API's
        raise error from exc
    runs = [ChoiceRun(i, s, ctx.tokenizer, ids, req.stop_list, ctx.count_finish)
            for i, (s, (ids, _, _)) in enumerate(zip(streams, requests))]
    return runs, ticket


# ---- completions -------------------------------------------------------------------------


async def create_completion(ctx: Context, req: CompletionRequest, request: Request) -> "dict | SSEStream":
    check_model(ctx, req.model)
    tok = ctx.tokenizer
    for p in req.prompts():
        if isinstance(p, str):
            check_prompt_chars(len(p), tok, ctx.max_model_len, "prompt")
    prompts = [list(tok.encode(p)) if isinstance(p, str) else list(p) for p in req.prompts()]
    meta = dict(id=random_id("cmpl"), created=int(time.time()), model=ctx.served_model_name)
    runs, ticket = await _start(ctx, req, prompts, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, req.logprobs, "prompt",
                                meta, "completions", req.prompt_logprobs_wanted)
    prompt_tokens = sum(len(p) for p in prompts)
    echo = [tok.decode(r.prompt_ids) if req.echo else "" for r in runs]
    # Prompt scores arrive with a choice's first engine output, so its echo waits for them.
    scored = req.prompt_logprobs_wanted is not None

    def choice(run: ChoiceRun, delta: ChoiceDelta, first: bool) -> CompletionChoice:
        """The choice for `delta`; the first one of a run carries the echo and the prompt's scores."""
        lp = None
        if req.logprobs is not None:
            prompt_part = echo_tokens(tok, run.prompt_ids, delta.prompt_logprobs) if req.echo and first else []
            lp = completion_logprobs(tok, prompt_part + [shift(t, len(echo[run.index])) for t in delta.tokens])
        prompt_lp = vllm_prompt_logprobs(tok, delta.prompt_logprobs) if req.prompt_logprobs is not None and first else None
        text = echo[run.index] + delta.text if first else delta.text
        return CompletionChoice(index=run.index, text=text, logprobs=lp, finish_reason=delta.finish_reason,
                                prompt_logprobs=prompt_lp)

    if req.stream:
        return SSEStream(_completion_chunks(runs, meta, echo, choice, scored, prompt_tokens, req.include_usage_chunk),
                         runs, ticket)
    deltas = await _collect(runs, ticket, request)
    choices = []
    for run, ds in zip(runs, deltas):
        choices.append(choice(run, _join(ds), first=True))
    usage = Usage.of_runs(prompt_tokens, runs)
    return CompletionResponse(choices=choices, usage=usage, **meta).model_dump()


async def _completion_chunks(runs: list[ChoiceRun], meta: dict, echo: list[str],
                             choice: Callable[[ChoiceRun, ChoiceDelta, bool], CompletionChoice], scored: bool,
                             prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}
    pending = {run.index for run in runs if scored}  # runs whose first chunk waits for the prompt's scores
    for run in runs:
        if echo[run.index] and not scored:
            yield CompletionResponse(choices=[CompletionChoice(index=run.index, text=echo[run.index])],
                                     **meta).model_dump_json(exclude=exclude)
    async for i, delta in merge([r.deltas() for r in runs]):
        first = i in pending
        pending.discard(i)
        if delta.text or delta.finish_reason or delta.tokens or first:
            body = CompletionResponse(choices=[choice(runs[i], delta, first)], **meta)
            yield body.model_dump_json(exclude=exclude)
    if include_usage:
        usage = Usage.of_runs(prompt_tokens, runs)
        yield CompletionResponse(choices=[], usage=usage, **meta).model_dump_json()


def completion_logprobs(tokenizer: Any, tokens: list[TokenInfo]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for t in tokens:
        out.tokens.append(token_string(token_bytes(tokenizer, t.token_id)))
        out.text_offset.append(t.text_offset)
        if t.logprob is None:  # the prompt's first token: nothing precedes it
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(t.logprob)
        top = {token_string(token_bytes(tokenizer, i)): lp for i, lp in t.top}
        top.setdefault(out.tokens[-1], t.logprob)  # the chosen token is always listed
        out.top_logprobs.append(top)
    return out


def shift(token: TokenInfo, offset: int) -> TokenInfo:
    return TokenInfo(token.token_id, token.logprob, token.top, token.text_offset + offset)


def echo_tokens(tokenizer: Any, prompt_ids: list[int], entries: list[dict | None] | None) -> list[TokenInfo]:
    """The prompt as logprob entries (the engine's, one per prompt token), with text offsets
    into the echoed prompt."""
    detok = IncrementalDetokenizer(tokenizer, (), skip_special_tokens=False)
    tokens, offset = [], 0
    for token_id, entry in zip(prompt_ids, entries or [None] * len(prompt_ids)):
        tokens.append(TokenInfo(token_id, entry["logprob"] if entry else None, list(entry["top"]) if entry else [],
                                offset))
        offset += len(detok.push(token_id))
    return tokens


def vllm_prompt_logprobs(tokenizer: Any, entries: list[dict | None] | None) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token, its own log-probability and the top
    alternatives, keyed by token id."""
    def one(token_id: int, logprob: float, rank: int | None) -> PromptLogprob:
        return PromptLogprob(logprob=logprob, rank=rank, decoded_token=token_string(token_bytes(tokenizer, token_id)))

    result: PromptLogprobs = []
    for entry in entries or []:
        if entry is None:
            result.append(None)
            continue
        scores = {str(entry["token_id"]): one(entry["token_id"], entry["logprob"], entry.get("rank"))}
        for rank, (token_id, logprob) in enumerate(entry["top"], start=1):
            scores.setdefault(str(token_id), one(token_id, logprob, rank))
        result.append(scores)
    return result


# ---- chat --------------------------------------------------------------------------------


async def create_chat_completion(ctx: Context, req: ChatCompletionRequest, request: Request) -> "dict | SSEStream":
    check_model(ctx, req.model)
    tok = ctx.tokenizer
    check_prompt_chars(sum(len(m.text) for m in req.messages), tok, ctx.max_model_len, "messages")
    ids = chat_prompt_ids(tok, req.messages, req.add_generation_prompt)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    meta = dict(id=random_id("chatcmpl"), created=int(time.time()), model=ctx.served_model_name)
    runs, ticket = await _start(ctx, req, [ids], req.max_new_tokens, None, logprobs, "messages", meta, "chat_completions",
                                req.prompt_logprobs, {"logprobs": "top_logprobs"})

    def lp(delta: ChoiceDelta) -> ChatLogprobs | None:
        return chat_logprobs(tok, delta.tokens) if req.logprobs else None

    def prompt_lp(delta: ChoiceDelta) -> PromptLogprobs | None:
        return vllm_prompt_logprobs(tok, delta.prompt_logprobs) if req.prompt_logprobs is not None else None

    if req.stream:
        return SSEStream(_chat_chunks(runs, meta, lp, prompt_lp, len(ids), req.include_usage_chunk), runs, ticket)
    deltas = await _collect(runs, ticket, request)
    choices = []
    for run, ds in zip(runs, deltas):
        whole = _join(ds)
        choices.append(ChatChoice(index=run.index, message=ChatResponseMessage(content=whole.text),
                                  logprobs=lp(whole), finish_reason=whole.finish_reason))
    usage = Usage.of_runs(len(ids), runs)
    return ChatCompletionResponse(choices=choices, usage=usage, prompt_logprobs=prompt_lp(_join(deltas[0])),
                                  **meta).model_dump()


async def _chat_chunks(runs: list[ChoiceRun], meta: dict, lp: Callable[[ChoiceDelta], ChatLogprobs | None],
                       prompt_lp: Callable[[ChoiceDelta], PromptLogprobs | None],
                       prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    scores_sent = False  # the prompt's scores (one prompt for every choice) ride on the first chunk after prefill

    def chunk(index: int, delta: DeltaMessage, logprobs: ChatLogprobs | None = None,
              finish: str | None = None, prompt_logprobs: PromptLogprobs | None = None) -> str:
        body = ChatCompletionChunk(choices=[ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                                            finish_reason=finish)], prompt_logprobs=prompt_logprobs,
                                   **meta)
        data = body.model_dump(exclude=None if include_usage else {"usage"})
        data["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # OpenAI sends {} for an empty delta
        return json.dumps(data, ensure_ascii=False)

    for run in runs:
        yield chunk(run.index, DeltaMessage(role="assistant", content=""))
    async for i, delta in merge([r.deltas() for r in runs]):
        scores = None if scores_sent or delta.prompt_logprobs is None else prompt_lp(delta)
        scores_sent = scores_sent or scores is not None
        if delta.text or delta.tokens:
            yield chunk(i, DeltaMessage(content=delta.text), lp(delta), prompt_logprobs=scores)
            scores = None
        if delta.finish_reason:
            yield chunk(i, DeltaMessage(), None, delta.finish_reason, prompt_logprobs=scores)
    if include_usage:
        usage = Usage.of_runs(prompt_tokens, runs)
        yield ChatCompletionChunk(choices=[], usage=usage, **meta).model_dump_json()


def chat_logprobs(tokenizer: Any, tokens: list[TokenInfo]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        raw = token_bytes(tokenizer, token_id)
        return TopLogprob(token=token_string(raw), logprob=logprob, bytes=list(raw))

    content = []
    for t in tokens:
        chosen = entry(t.token_id, t.logprob if t.logprob is not None else 0.0)
        top = [entry(i, v) for i, v in t.top]
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


# ---- shared plumbing ---------------------------------------------------------------------


def _join(deltas: list[ChoiceDelta]) -> ChoiceDelta:
    last = deltas[-1] if deltas else ChoiceDelta("", finish_reason="stop")
    return ChoiceDelta("".join(d.text for d in deltas), [t for d in deltas for t in d.tokens],
                       last.finish_reason, last.completion_tokens, deltas[0].prompt_logprobs if deltas else None)


async def _collect(runs: list[ChoiceRun], ticket: Ticket, request: Request) -> list[list[ChoiceDelta]]:
    """Gather every choice's deltas; a client that hangs up cancels (and frees) its requests."""
    results: list[list[ChoiceDelta]] = [[] for _ in runs]

    async def gather() -> None:
        async for i, delta in merge([r.deltas() for r in runs]):
            results[i].append(delta)

    work = asyncio.ensure_future(gather())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientDisconnected()
        try:
            work.result()
        except Exception as exc:
            raise from_exception(exc) from exc
    finally:
        watcher.cancel()
        work.cancel()
        _close(runs, ticket)
    return results


async def _disconnected(request: Request) -> None:
    while True:  # the body is already read, so the next message can only be a disconnect
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _close(runs: list[ChoiceRun], ticket: Ticket) -> None:
    for run in runs:
        run.stream.abort("client")  # a no-op for a finished run
    ticket.release()


class SSEStream:
    """SSE events: the chunks, an error event if generation fails, then [DONE].

    `close` frees the engine requests and their admission; the response calls it however it
    ends, even when the client left before the first event was produced."""

    def __init__(self, chunks: AsyncIterator[str], runs: list[ChoiceRun], ticket: Ticket) -> None:
        self._chunks = chunks
        self._runs = runs
        self._ticket = ticket

    def close(self) -> None:
        _close(self._runs, self._ticket)

    async def events(self) -> AsyncIterator[dict]:
        try:
            try:
                async for data in self._chunks:
                    yield {"data": data}
            except Exception as exc:
                error = from_exception(exc)
                yield {"data": error.body().model_dump_json()}
            yield {"data": "[DONE]"}
        finally:  # also runs when the client disconnects and the response task is cancelled
            self.close()
