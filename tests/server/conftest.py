"""Fixtures: the embedded model (loaded once), the engine's reference outputs, one real uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

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

    # A short context makes "prompt too long" cheap to provoke.
    return load_model(max_model_len=MAX_MODEL_LEN)


def serve_in_thread(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here so no other process can take the port first
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{port}"


def wait_ready(base_url: str, deadline_s: float = 300.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {base_url} not ready after {deadline_s}s")


@pytest.fixture(scope="session")
def server(loaded, references) -> Iterator[ServerHandle]:
    from server.app import ServerSettings, build_app

    # `references` runs first: the engine's own outputs are computed before the server shares the model.
    app = build_app(ServerSettings(api_key=API_KEY, max_model_len=MAX_MODEL_LEN), loader=lambda: loaded)
    srv, thread, url = serve_in_thread(app)
    wait_ready(url)
    yield ServerHandle(url, app, loaded)
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="session")
def references(loaded) -> dict[str, Reference]:
    from esp_engine.config import SamplingParams, SpecConfig
    from esp_engine.engine import LLMEngine

    tok = loaded.tokenizer
    engine = LLMEngine(loaded, SpecConfig.from_preset("ar"))

    def ref(ids: list[int], max_tokens: int, ignore_eos: bool = False) -> Reference:
        out = engine.generate(ids, SamplingParams(max_new_tokens=max_tokens, ignore_eos=ignore_eos),
                              SpecConfig.from_preset("ar"))
        return Reference(ids, out.output_ids, tok.decode(out.output_ids, skip_special_tokens=True), out.finish_reason)

    chat_text = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    refs = {
        "completion": ref(tok.encode(COMPLETION_PROMPT), 16),
        "chat": ref(tok.encode(chat_text, add_special_tokens=False), 16),
        "long": ref(tok.encode(LONG_PROMPT), 48, ignore_eos=True),
    }
    for i, p in enumerate(CONCURRENT_PROMPTS):
        refs[f"concurrent{i}"] = ref(tok.encode(p), 12)
    return refs
