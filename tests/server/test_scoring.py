"""Scoring prompts the way evaluation harnesses do: `echo` with `logprobs` on /v1/completions
(lm-evaluation-harness's `local-completions` log-likelihood request, word for word), scoring
only with `max_tokens: 0`, and vLLM's `prompt_logprobs` on both endpoints. Every number is
checked against a direct forward pass over the same tokens."""

from __future__ import annotations

import json

import pytest
import torch

from esp_engine.kv_cache import KVCache
from serverutil import CHAT_MESSAGES

MODEL = "smollm2-135m-instruct"


def direct_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is log p(. | ids[: i + 1]), from one forward pass."""
    model = loaded.model
    shape = model.shape
    cache = KVCache.standalone(shape.num_layers, shape.num_kv_heads, shape.head_dim, len(ids), model.dtype)
    with torch.inference_mode():
        hidden = model(cache, model.embed(torch.tensor(ids)), torch.arange(len(ids)), None)
        return torch.log_softmax(model.logits(hidden), dim=-1)[:-1]


def harness_loglikelihood(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's `LocalCompletionsAPI.parse_logprobs` for one choice."""
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(token_logprobs), all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs))


def test_the_lm_eval_loglikelihood_request_scores_each_continuation(server) -> None:
    tok = server.loaded.tokenizer
    context = tok.encode("Question: What is the capital of France?\nAnswer:")
    continuations = [tok.encode(" Paris"), tok.encode(" a large purple elephant")]
    prompts = [context + c for c in continuations]
    payload = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}  # exactly what local-completions sends for a log-likelihood request
    with server.http() as http:
        r = http.post("/v1/completions", json=payload)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    scores = []
    for choice, ids in zip(choices, prompts):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then one new token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert choice["text"].startswith(tok.decode(ids))
        expected = direct_logprobs(server.loaded, ids)
        want = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1 : len(ids)]), want, rtol=1e-4, atol=1e-4)
        total, greedy = harness_loglikelihood(choice, len(context))
        assert total == pytest.approx(float(want[len(context) - 1 :].sum()), abs=1e-3)
        assert greedy == bool((expected[len(context) - 1 :].argmax(-1) == torch.tensor(ids[len(context) :])).all())
        scores.append(total)
    assert scores[0] > scores[1]  # the model knows where Paris is


def test_max_tokens_0_scores_a_text_prompt_and_generates_nothing(server) -> None:
    tok = server.loaded.tokenizer
    text = "The quick brown fox jumps over the lazy dog"
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 0, "echo": True,
                                               "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    [choice] = body["choices"]
    ids = tok.encode(text)
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(len(top) in (2, 3) for top in lp["top_logprobs"][1:])  # top-2, plus the token itself if not among them
    want = direct_logprobs(server.loaded, ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), want, rtol=1e-4, atol=1e-4)


def test_vllm_prompt_logprobs_on_chat_and_completions(server) -> None:
    tok = server.loaded.tokenizer
    with server.http() as http:
        chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT_MESSAGES, "max_tokens": 3,
                                                       "temperature": 0, "prompt_logprobs": 1}).json()
        comp = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 2,
                                                  "temperature": 0, "prompt_logprobs": 0}).json()
    scores = chat["prompt_logprobs"]
    assert scores[0] is None and len(scores) == chat["usage"]["prompt_tokens"]
    for entry in scores[1:]:
        assert 1 <= len(entry) <= 2 and all(v["rank"] >= 1 for v in entry.values())
        assert any(v["rank"] == 1 for v in entry.values())  # the top-1 alternative is listed with its rank
    [choice] = comp["choices"]
    ids = tok.encode("Hello there")
    assert [list(e) for e in choice["prompt_logprobs"][1:]] == [[str(t)] for t in ids[1:]]  # only the token itself
    assert choice["logprobs"] is None  # prompt scores are not completion logprobs


def test_a_streamed_echo_carries_the_prompt_scores_in_its_first_chunk(server) -> None:
    text = "One two three four"
    payload = {"model": MODEL, "prompt": text, "max_tokens": 4, "echo": True, "logprobs": 0, "temperature": 0,
               "stream": True}
    with server.http() as http:
        whole = http.post("/v1/completions", json={**payload, "stream": False}).json()["choices"][0]
        with http.stream("POST", "/v1/completions", json=payload) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    first = events[0]["choices"][0]
    n = len(server.loaded.tokenizer.encode(text))
    assert first["text"].startswith(server.loaded.tokenizer.decode(server.loaded.tokenizer.encode(text)))
    assert first["logprobs"]["token_logprobs"][0] is None and len(first["logprobs"]["tokens"]) >= n
    streamed = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
    # The same tokens; a token's log-probability may round differently in a speculative pass than a plain one.
    assert streamed[0] is None and whole["logprobs"]["token_logprobs"][0] is None
    assert streamed[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-4)
    assert "".join(c["text"] for e in events for c in e["choices"]) == whole["text"]


def test_a_continuation_the_model_would_end_is_scored_with_its_end_token(server) -> None:
    """The greedy token after this answer is the end-of-turn token: the request ends on it
    ("stop"), and its log-probability is still listed last, where the harness expects the one
    generated token, so the answer's own tokens keep their place."""
    tok = server.loaded.tokenizer
    context = tok.encode("Question: Which season comes after winter?\nAnswer:")
    ids = context + tok.encode(" spring")
    payload = {"model": MODEL, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    with server.http() as http:
        body = http.post("/v1/completions", json=payload).json()
    [choice] = body["choices"]
    expected = direct_logprobs(server.loaded, ids + [0])  # the last row scores what follows the prompt
    end = int(expected[-1].argmax())
    assert end in server.loaded.eos_token_ids, "the prompt no longer leads to the end token; pick another"
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 1
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["tokens"][-1] == tok.convert_ids_to_tokens(end)
    assert lp["token_logprobs"][-1] == pytest.approx(float(expected[-1, end]), abs=1e-4)
    total, _ = harness_loglikelihood(choice, len(context))
    want = expected[torch.arange(len(context) - 1, len(ids) - 1), torch.tensor(ids[len(context):])].sum()
    assert total == pytest.approx(float(want), abs=1e-4) and total < 0
