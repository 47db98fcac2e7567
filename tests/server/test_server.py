"""The real server (one uvicorn per session, the embedded model) through the real openai SDK."""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from esp_engine.errors import InvalidRequestError
from esp_engine.proposers import proposer_class

from serverutil import (
    CHAT_MESSAGES,
    COMPLETION_PROMPT,
    CONCURRENT_PROMPTS,
    LONG_PROMPT,
    MAX_MODEL_LEN,
    ServerHandle,
)

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> openai.OpenAI:
    return server.client()


def metric(server: ServerHandle, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when the series does not exist yet)."""
    with server.http(auth=False) as http:
        text = http.get("/metrics").text
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, what: str, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def error_body(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


# ---- completions and chat ---------------------------------------------------------------


def test_completion_greedy_matches_engine(client, references) -> None:
    ref = references["completion"]
    r = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert r.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("method", ["off", "esp", "pld", "lade", "hybrid"])
def test_spec_method_override_gives_identical_text(client, references, method) -> None:
    ref = references["completion"]
    r = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=16, temperature=0,
                                  extra_body={"spec_method": method, "spec_preset": None if method == "off" else "bc10"})
    assert r.choices[0].text == ref.text


def test_completion_streaming_matches_engine(client, references) -> None:
    ref = references["completion"]
    chunks = list(client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_token_id_prompt_and_prompt_list(client, references) -> None:
    ref = references["completion"]
    r = client.completions.create(model=MODEL, prompt=ref.prompt_ids, max_tokens=16, temperature=0)
    assert r.choices[0].text == ref.text
    r = client.completions.create(model=MODEL, prompt=[COMPLETION_PROMPT, CONCURRENT_PROMPTS[0]], max_tokens=12,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == ref.text[: len(r.choices[0].text)]
    assert r.choices[1].text == references["concurrent0"].text


def test_echo(client, references) -> None:
    r = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=16, temperature=0, echo=True)
    assert r.choices[0].text == COMPLETION_PROMPT + references["completion"].text


def test_chat_greedy_matches_engine(client, references) -> None:
    ref = references["chat"]
    r = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert r.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")
    # list-of-parts content and max_completion_tokens are the same request
    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT_MESSAGES[0]["content"]}]}]
    r2 = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=16, temperature=0,
                                        extra_body={"spec_method": "pld"})
    assert r2.choices[0].message.content == ref.text


def test_chat_streaming(client, references) -> None:
    ref = references["chat"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is chunks[-2]
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_ids)


def test_max_tokens_length_finish(client) -> None:
    r = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_default_max_tokens_is_16_for_completions(client) -> None:
    r = client.completions.create(model=MODEL, prompt=LONG_PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


# ---- stop strings -----------------------------------------------------------------------


def spanning_stop(tokenizer, ref) -> tuple[str, str, int]:
    """A stop string that starts inside the 3rd token's text and ends inside the 6th's.

    Returns (stop, expected text, expected completion tokens)."""
    ends = [len(tokenizer.decode(ref.token_ids[: k + 1])) for k in range(len(ref.token_ids))]
    start, end = ends[1] + 1, ends[4] + 1  # inside tokens 2 and 5 (0-based)
    assert ends[2] > start and ends[5] > end, "reference tokens too short to build a spanning stop"
    stop = ref.text[start:end]
    return stop, ref.text[: ref.text.index(stop)], 6


@pytest.mark.parametrize("method", ["off", "esp"])
def test_stop_string_spanning_tokens(client, references, tokenizer, method) -> None:
    ref = references["long"]
    stop, expected, n_tokens = spanning_stop(tokenizer, ref)
    r = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=48, temperature=0, stop=[stop, "@@@"],
                                  extra_body={"spec_method": method, "ignore_eos": True})
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == n_tokens  # the same whatever the method committed per pass


@pytest.mark.parametrize("method", ["off", "esp"])
def test_stop_string_never_leaked_in_stream(client, references, tokenizer, method) -> None:
    ref = references["long"]
    stop, expected, _ = spanning_stop(tokenizer, ref)
    stream = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=48, temperature=0, stop=stop,
                                       stream=True, extra_body={"spec_method": method, "ignore_eos": True})
    chunks = [c.choices[0] for c in stream if c.choices]
    # Exactly the text before the stop: no piece of the stop string (held back while it could match) went out.
    assert "".join(c.text for c in chunks) == expected
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


def test_chat_stop_string(client, references) -> None:
    ref = references["chat"]
    stop = ref.text.split()[2]
    r = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].message.content == ref.text[: ref.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


# ---- sampling, n, logprobs -------------------------------------------------------------


def test_seeded_sampling_is_repeatable_across_methods(client) -> None:
    kwargs = dict(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=12, temperature=0.9, seed=1234)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs, extra_body={"spec_method": "off"})
    c = client.completions.create(**kwargs, extra_body={"spec_method": "hybrid"})
    assert a.choices[0].text == b.choices[0].text == c.choices[0].text


def test_n_choices(client, references) -> None:
    ref = references["chat"]
    r = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=16, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == ref.text for c in r.choices)
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert r.usage.completion_tokens == 2 * (len(ref.token_ids) + (ref.finish_reason == "stop"))
    seeded = dict(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=1.0, seed=7, n=3, stream=True)
    texts = [{}, {}]
    for run in range(2):
        for chunk in client.completions.create(**seeded):
            for c in chunk.choices:
                texts[run][c.index] = texts[run].get(c.index, "") + c.text
    assert sorted(texts[0]) == [0, 1, 2] and texts[0] == texts[1]


def test_completion_logprobs(client, references) -> None:
    r = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert top[token] == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_chat_logprobs_streaming(client) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 5
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token or e.token.startswith("bytes:")


# ---- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(prompt=""), None),
        (dict(prompt=[7, 10**9]), None),
        (dict(prompt="hi", temperature=5.0), "temperature"),
        (dict(prompt="hi", temperature=-1), "temperature"),
        (dict(prompt="hi", top_p=0), "top_p"),
        (dict(prompt="hi", n=0), "n"),
        (dict(prompt="hi", max_tokens=-1), "max_tokens"),  # 0 is valid: it scores the prompt
        (dict(prompt="hi", logprobs=50), "logprobs"),
        (dict(prompt="hi", extra_body={"spec_method": "medusa"}), "spec_method"),
        (dict(prompt="hi", extra_body={"spec_method": "esp", "spec_preset": "bc99"}), "spec_method"),
        (dict(prompt="hi", frequency_penalty=0.5), "frequency_penalty"),
    ],
)
def test_invalid_completion_requests_are_400(client, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, max_tokens=kwargs.pop("max_tokens", 4), **kwargs)
    assert info.value.status_code == 400
    err = error_body(info.value)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=2.5), "temperature"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(max_completion_tokens=-2), "max_tokens"),
        (dict(extra_body={"prompt_logprobs": 99}), "prompt_logprobs"),
    ],
)
def test_invalid_chat_requests_are_400_naming_the_field(client, kwargs, param) -> None:
    """The engine checks every sampling range once; the client still learns which field was wrong."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, **kwargs)
    err = error_body(info.value)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_invalid_stream_request_fails_before_the_stream(server, client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", temperature=9, stream=True)
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "stream": True})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")


def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=CHAT_MESSAGES, max_tokens=4)
    assert error_body(info.value)["code"] == "model_not_found"


def test_api_key_required(server) -> None:
    for key in ("wrong-key", None):
        with server.http(auth=False) as http:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    assert metric(server, "esp:request_errors_total", status="401") >= 3
    with server.http(auth=False) as http:  # probes and scrapers need no key
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_prompt_too_long_is_400(client) -> None:
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert error_body(info.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=MAX_MODEL_LEN)
    assert error_body(info.value)["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2, 3]", b'{"model": "smollm2-135m-instruct"}', b'{"prompt": "hi", "n": "many"}'],
)
def test_malformed_bodies_are_400_not_422(server, body) -> None:
    with server.http() as http:
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_is_openai_error(server) -> None:
    with server.http() as http:
        r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_server_still_answers_after_errors(client, references) -> None:
    r = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == references["completion"].text


def test_error_inside_generation_reaches_only_that_request(server, client, references, monkeypatch) -> None:
    """A failure in one request's own work (here as its drafting starts, at prefill) fails it
    alone, typed: an engine fault is a 500 with its message, a client's fault a 400; a stream in
    progress continues."""
    worker = server.app.state.engine
    proposer = proposer_class(worker.default_spec.method)
    real_begin = proposer.begin
    poison = server.loaded.tokenizer.encode("POISON PROMPT")
    refused = server.loaded.tokenizer.encode("REFUSED PROMPT")

    def begin(self, prompt_ids, prompt_embeds):
        if prompt_ids == poison:
            raise RuntimeError("injected failure")
        if prompt_ids == refused:
            raise InvalidRequestError("refused deep inside the engine")
        return real_begin(self, prompt_ids, prompt_embeds)

    ref = references["long"]
    monkeypatch.setattr(proposer, "begin", begin)
    good = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=48, temperature=0, stream=True,
                                     extra_body={"ignore_eos": True})
    it = iter(good)
    first = next(it).choices[0].text
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=MODEL, prompt=poison, max_tokens=4)
    assert error_body(info.value)["message"] == "internal error during generation: RuntimeError: injected failure"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=refused, max_tokens=4)
    assert error_body(info.value)["message"] == "refused deep inside the engine"
    with pytest.raises(openai.APIError, match="injected failure"):
        for _ in client.completions.create(model=MODEL, prompt=poison, max_tokens=4, stream=True):
            pass
    rest = "".join(c.choices[0].text for c in it if c.choices)
    assert first + rest == ref.text
    assert worker.is_alive


# ---- disconnects and concurrency ----------------------------------------------------------


def test_stream_disconnect_frees_the_request(server, client) -> None:
    before = metric(server, "esp:requests_aborted_total", reason="client")
    stream = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # generating
    stream.close()
    wait_for(lambda: metric(server, "esp:requests_aborted_total", reason="client") == before + 1, "the abort")
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0, "running gauge back to 0")
    assert metric(server, "vllm:num_requests_waiting") == 0


def test_non_stream_disconnect_frees_the_request(server) -> None:
    before = metric(server, "esp:requests_aborted_total", reason="client")
    host, port = server.base_url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 400, "ignore_eos": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer test-key\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(request)
        wait_for(lambda: metric(server, "vllm:num_requests_running") == 1, "the request to run")
    wait_for(lambda: metric(server, "esp:requests_aborted_total", reason="client") == before + 1, "the abort")
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0, "running gauge back to 0")


def test_concurrent_streaming_clients(client, references) -> None:
    def run(i: int) -> str:
        method = ["esp", "off", "pld", "hybrid"][i]
        stream = client.completions.create(model=MODEL, prompt=CONCURRENT_PROMPTS[i], max_tokens=12, temperature=0,
                                           stream=True, extra_body={"spec_method": method})
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(run, range(4)))
    assert texts == [references[f"concurrent{i}"].text for i in range(4)]


# ---- other endpoints ----------------------------------------------------------------------


def test_models(client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_health_and_metrics(server, client) -> None:
    client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0,
                              extra_body={"spec_method": "esp"})
    with server.http(auth=False) as http:
        assert http.get("/health").json() == {"status": "ok"}
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ["vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                 "esp:acceptance_length_bucket", "esp:forward_calls_total", "esp:tokens_committed_total",
                 "esp:block_rows_bucket", "vllm:time_to_first_token_seconds_bucket", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total", "vllm:num_requests_running"]:
        assert name in r.text, name
    assert metric(server, "esp:forward_calls_total", method="esp") > 0
    assert metric(server, "vllm:spec_decode_num_drafts_total", model_name=MODEL) > 0


def test_prefix_cache_serves_a_shared_system_prompt(server, client) -> None:
    system = {"role": "system", "content": "You answer questions about a small bakery in one sentence. "
                                           "Be polite, be brief, and never invent prices or opening hours."}
    first = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
        system, {"role": "user", "content": "Do you sell bread?"}])
    second = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
        system, {"role": "user", "content": "Do you bake cakes?"}])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    assert metric(server, "vllm:prefix_cache_hits_total", model_name=MODEL) >= cached
    assert metric(server, "vllm:prefix_cache_queries_total", model_name=MODEL) >= first.usage.prompt_tokens + second.usage.prompt_tokens


def test_tokenize_detokenize(server, references) -> None:
    ref = references["completion"]
    with server.http() as http:
        r = http.post("/tokenize", json={"model": MODEL, "prompt": COMPLETION_PROMPT})
        assert r.status_code == 200
        assert r.json() == {"tokens": ref.prompt_ids, "count": len(ref.prompt_ids), "max_model_len": MAX_MODEL_LEN}
        r = http.post("/tokenize", json={"messages": CHAT_MESSAGES})
        assert r.json()["tokens"] == references["chat"].prompt_ids
        r = http.post("/detokenize", json={"tokens": ref.prompt_ids})
        assert r.json() == {"prompt": COMPLETION_PROMPT}
        assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
        assert http.post("/tokenize", json={}).status_code == 400
