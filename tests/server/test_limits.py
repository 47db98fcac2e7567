"""Hostile input and load: non-finite numbers, out-of-range integers, oversized bodies and
prompts, admission beyond capacity (429), readiness, and the documented error contract."""

from __future__ import annotations

import dataclasses
import json
import threading

import httpx
import pytest

from liveserver import running
from serverutil import MAX_MODEL_LEN, ServerHandle

from test_server import metric, wait_for

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
BODIES = {"/v1/completions": {"prompt": "Hi", "max_tokens": 2},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def raw(base: dict, **fields: str) -> str:
    """`base` as JSON with some values spliced in verbatim (NaN and friends are not JSON)."""
    text = json.dumps(base)[:-1]
    return text + "".join(f', "{k}": {v}' for k, v in fields.items()) + "}"


# ---- non-finite numbers and integer ranges ------------------------------------------------


@pytest.mark.parametrize("path", GENERATION_PATHS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_400(server: ServerHandle, path: str, literal: str) -> None:
    with server.http() as http:
        for body in (raw(BODIES[path], temperature=literal), raw(BODIES[path], logit_bias=f'{{"11": {literal}}}'),
                     raw(BODIES[path], extra_field=f"[1, {{\"deep\": {literal}}}]")):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert "not valid JSON" in assert_openai_error(r, 400)["message"]
        assert http.post(path, json=BODIES[path]).status_code == 200  # and the server is fine


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", rb'{"prompt": "a \ud800 b", "max_tokens": 2}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\udc00"}], "max_tokens": 2}'),
    ("/tokenize", rb'{"prompt": "\ud800"}'),
    ("/v1/completions", b'{"prompt": "a \xed\xa0\x80", "max_tokens": 2}'),  # the same, as raw bytes
])
def test_unpaired_surrogates_are_400(server: ServerHandle, path: str, body: bytes) -> None:
    with server.http() as http:
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert "surrogate" in assert_openai_error(r, 400)["message"]
        # A pair spelled in escapes is one character, and fine.
        r = http.post("/tokenize", content=rb'{"prompt": "\ud83d\ude00"}', headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["count"] >= 1


@pytest.mark.parametrize("path", GENERATION_PATHS)
@pytest.mark.parametrize("field,value", [("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 2**80),
                                         ("max_tokens", 2**31), ("top_k", 2**40)])
def test_integers_beyond_their_range_are_400(server: ServerHandle, path: str, field: str, value: int) -> None:
    with server.http() as http:
        assert_openai_error(http.post(path, json={**BODIES[path], field: value}), 400, param=field)


def test_max_completion_tokens_beyond_its_range_is_400(server: ServerHandle) -> None:
    body = {**BODIES["/v1/chat/completions"], "max_completion_tokens": 2**31}
    with server.http() as http:
        assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param="max_completion_tokens")


def test_integer_literal_too_long_to_parse_is_400(server: ServerHandle) -> None:
    with server.http() as http:
        r = http.post("/v1/completions", content=raw(BODIES["/v1/completions"], seed="9" * 5000),
                      headers={"Content-Type": "application/json"})
        assert_openai_error(r, 400)


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_extreme_64_bit_seeds_work_with_several_choices(server: ServerHandle, seed: int) -> None:
    with server.http() as http:
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "seed": seed, "n": 3})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 3


def test_token_ids_beyond_int64_are_400(server: ServerHandle) -> None:
    with server.http() as http:
        assert_openai_error(http.post("/v1/completions", json={"prompt": [1, 2**80], "max_tokens": 2}), 400)
        # Longer than the context: refused by its length, whatever the ids are.
        r = http.post("/v1/completions", json={"prompt": [2**80] * (MAX_MODEL_LEN + 1), "max_tokens": 2})
        assert_openai_error(r, 400, code="context_length_exceeded", param="prompt")


# ---- a server with tight limits: body size, capacity one, a tokenizer that reports its inputs ----


class SpyTokenizer:
    """The real tokenizer, recording the length of every text it is asked to encode."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.encoded_lengths: list[int] = []

    def encode(self, text, *args, **kwargs):
        self.encoded_lengths.append(len(text))
        return self._inner.encode(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


TIGHT_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def tight(loaded):
    """Body limit 64 KiB, one running sequence and no waiting room: a second request is 429."""
    from esp_engine.scheduler import SchedulerConfig
    from server.app import ServerSettings, build_app

    spy = SpyTokenizer(loaded.tokenizer)
    settings = ServerSettings(max_model_len=MAX_MODEL_LEN, max_request_bytes=TIGHT_BODY_BYTES,
                              max_waiting_requests=0, scheduler=SchedulerConfig(max_num_seqs=1))
    app = build_app(settings, loader=lambda: dataclasses.replace(loaded, tokenizer=spy))
    with running(app) as url:
        yield ServerHandle(url, app, loaded), spy


def test_body_over_the_limit_is_413_before_it_is_read(tight) -> None:
    server, _ = tight
    with server.http() as http:
        big = json.dumps({"prompt": "a" * TIGHT_BODY_BYTES, "max_tokens": 1})
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
            r = http.post(path, content=big, headers={"Content-Type": "application/json"})
            assert_openai_error(r, 413, code="request_too_large")

        def chunks():  # no Content-Length: the limit applies as the body arrives
            yield b'{"prompt": "'
            for _ in range(TIGHT_BODY_BYTES // 1024 + 1):
                yield b"a" * 1024
            yield b'", "max_tokens": 1}'

        r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert_openai_error(r, 413, code="request_too_large")
        assert http.post("/v1/completions", json={"prompt": "a" * 1000, "max_tokens": 1}).status_code == 200


def test_prompt_far_beyond_the_context_is_refused_without_tokenizing(tight) -> None:
    server, spy = tight
    text = "word " * (TIGHT_BODY_BYTES // 5 - 20)  # fits the body limit, not the context
    with server.http() as http:
        spy.encoded_lengths.clear()
        r = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
        assert_openai_error(r, 400, code="context_length_exceeded", param="prompt")
        r = http.post("/v1/completions", json={"prompt": ["Hi", text], "max_tokens": 1})
        assert_openai_error(r, 400, code="context_length_exceeded", param="prompt")
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
        assert_openai_error(r, 400, code="context_length_exceeded", param="messages")
        assert all(n < len(text) for n in spy.encoded_lengths), spy.encoded_lengths


def test_beyond_capacity_is_429_with_retry_after_and_not_ready(tight) -> None:
    server, _ = tight
    before = metric(server, "esp:requests_rejected_total", reason="saturated")
    first_chunk = threading.Event()
    release = threading.Event()
    with server.http() as http:
        assert http.get("/ready").json()["status"] == "ready"

        def hold_the_only_slot() -> None:
            body = {"prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=server.base_url, timeout=300) as c, c.stream("POST", "/v1/completions",
                                                                                      json=body) as r:
                for _ in r.iter_lines():
                    first_chunk.set()
                    if release.is_set():
                        break  # hang up mid-stream: the server frees the slot

        holder = threading.Thread(target=hold_the_only_slot)
        holder.start()
        try:
            assert first_chunk.wait(120)
            for path in GENERATION_PATHS:
                r = http.post(path, json=BODIES[path])
                assert_openai_error(r, 429, code="server_saturated")
                assert r.json()["error"]["type"] == "rate_limit_error"
                assert int(r.headers["Retry-After"]) >= 1
            ready = http.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "saturated"
            assert ready.json()["error"]["code"] == "saturated"
            assert http.get("/health").status_code == 200  # alive, just busy
            assert metric(server, "esp:requests_rejected_total", reason="saturated") == before + 2
        finally:
            release.set()
            holder.join(300)
        wait_for(lambda: http.get("/ready").status_code == 200, "the slot to be freed", 60)
        # An idle server takes a request even when it asks for more choices than the capacity.
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert http.get("/ready").json() == {"status": "ready", "message": "ready to take requests",
                                             "outstanding": 0, "capacity": 1, "error": None}


def test_ready_says_loading_then_ready(loaded) -> None:
    from fastapi.testclient import TestClient

    from server.app import ServerSettings, build_app

    gate = threading.Event()

    def slow_loader():
        assert gate.wait(120)
        return loaded

    with TestClient(build_app(ServerSettings(), loader=slow_loader)) as client:
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.json()["error"]["code"] == "loading"
        gate.set()
        wait_for(lambda: client.get("/ready").status_code == 200, "the model to load")
        assert client.get("/ready").json()["status"] == "ready"


def test_ready_reports_a_failed_load() -> None:
    from fastapi.testclient import TestClient

    from esp_engine.errors import ModelLoadError
    from server.app import ServerSettings, build_app

    def broken_loader():
        raise ModelLoadError("no such model")

    with TestClient(build_app(ServerSettings(), loader=broken_loader)) as client:
        wait_for(lambda: client.get("/ready").json()["status"] != "loading", "the load to fail", 60)
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "load_failed"
        assert "no such model" in r.json()["message"]


# ---- the documented contract --------------------------------------------------------------


def test_openapi_documents_every_error_with_the_error_schema(server: ServerHandle) -> None:
    with server.http(auth=False) as http:
        schema = http.get("/openapi.json").json()
    error_ref = "#/components/schemas/ErrorResponse"
    expected = {("post", "/v1/completions"): {"400", "401", "404", "413", "429", "500", "503"},
                ("post", "/v1/chat/completions"): {"400", "401", "404", "413", "429", "500", "503"},
                ("post", "/tokenize"): {"400", "401", "404", "413", "500", "503"},
                ("post", "/detokenize"): {"400", "401", "404", "413", "500", "503"},
                ("get", "/v1/models"): {"401", "500", "503"},
                ("get", "/health"): {"500", "503"}}
    for (method, path), statuses in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert "422" not in responses, path  # validation errors are 400
        assert {s for s in responses if s != "200"} == statuses, path
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "text/event-stream" in completions["200"]["content"]
    assert "Retry-After" in completions["429"]["headers"]
    assert "503" in schema["paths"]["/ready"]["get"]["responses"]


def test_wrong_method_is_405_with_allow(server: ServerHandle) -> None:
    with server.http() as http:
        r = http.get("/v1/completions")
        assert_openai_error(r, 405)
        assert r.headers["Allow"] == "POST"
        r = http.post("/v1/models")
        assert_openai_error(r, 405)
        assert "GET" in r.headers["Allow"]
