"""Fixtures: the embedded model (loaded once), the engine's reference outputs, one real uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from liveserver import running
from serverutil import (
    API_KEY,
    CHAT_MESSAGES,
    COMPLETION_PROMPT,
    CONCURRENT_PROMPTS,
    LONG_PROMPT,
    MAX_MODEL_LEN,
    Reference,
    ServerHandle,
)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from esp_engine.loader import prepare_embedded_model

    return AutoTokenizer.from_pretrained(prepare_embedded_model())


@pytest.fixture(scope="session")
def loaded():
    from esp_engine.loader import load_model

    # A short context makes "prompt too long" cheap to provoke; float32 on every CPU, since the
    # scoring tests compare logprobs with a direct pass to fp32 tolerances.
    return load_model(dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def server(loaded, references) -> Iterator[ServerHandle]:
    from server.app import ServerSettings, build_app

    # `references` runs first: the engine's own outputs are computed before the server shares the model.
    app = build_app(ServerSettings(api_key=API_KEY, max_model_len=MAX_MODEL_LEN), loader=lambda: loaded)
    with running(app) as url:
        yield ServerHandle(url, app, loaded)


@pytest.fixture(scope="session")
def references(loaded) -> dict[str, Reference]:
    from esp_engine.chat import render_chat
    from esp_engine.config import SamplingParams, SpecConfig
    from esp_engine.engine import LLMEngine

    tok = loaded.tokenizer
    engine = LLMEngine(loaded, SpecConfig.from_preset("ar"))

    def ref(ids: list[int], max_tokens: int, ignore_eos: bool = False) -> Reference:
        out = engine.generate(ids, SamplingParams(max_new_tokens=max_tokens, ignore_eos=ignore_eos),
                              SpecConfig.from_preset("ar"))
        return Reference(ids, out.output_ids, tok.decode(out.output_ids, skip_special_tokens=True), out.finish_reason)

    refs = {
        "completion": ref(tok.encode(COMPLETION_PROMPT), 16),
        "chat": ref(render_chat(tok, CHAT_MESSAGES), 16),
        "long": ref(tok.encode(LONG_PROMPT), 48, ignore_eos=True),
    }
    for i, p in enumerate(CONCURRENT_PROMPTS):
        refs[f"concurrent{i}"] = ref(tok.encode(p), 12)
    return refs
