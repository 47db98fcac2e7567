"""Constants and small helpers shared by the server tests (conftest.py holds the fixtures)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

API_KEY = "test-key"
MAX_MODEL_LEN = 512


@dataclass
class ServerHandle:
    base_url: str
    app: object
    loaded: object

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", API_KEY)
        kwargs.setdefault("max_retries", 0)  # retries would hide (and repeat) the errors under test
        kwargs.setdefault("timeout", 300)
        return openai.OpenAI(base_url=self.base_url + "/v1", **kwargs)

    def http(self, auth: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=300, follow_redirects=False)


# ---- reference outputs straight from the engine (greedy, speculation off) ----------------

COMPLETION_PROMPT = "The capital of France is"
CHAT_MESSAGES = [{"role": "user", "content": "Name three colors."}]
CONCURRENT_PROMPTS = ["Once upon a time", "The best way to learn Python is", "def fibonacci(n):", "Water boils at"]
LONG_PROMPT = "The history of the Roman Empire"


@dataclass
class Reference:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
