"""Shared fixtures: the real embedded model (loaded once per session) and a tiny random model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SPEC_BENCH = Path(os.environ.get("ESP_SPEC_BENCH", Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"))


@pytest.fixture(scope="session")
def smol():
    from esp_engine.loader import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smol_bf16():
    from esp_engine.loader import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="bfloat16")


@pytest.fixture(scope="session")
def smol_engine(smol):
    from esp_engine.engine import LLMEngine

    return LLMEngine(smol)


def chat_ids(tokenizer, text: str) -> list[int]:
    from esp_engine.chat import render_chat

    return render_chat(tokenizer, [{"role": "user", "content": text}])


def round_robin(questions: list[dict], n: int) -> list[dict]:
    """The first `n` questions taking one category after another, so every category is in."""
    by_category: dict[str, list[dict]] = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    queues = [list(items) for items in by_category.values()]
    picked: list[dict] = []
    while len(picked) < n and any(queues):
        for items in queues:
            if items and len(picked) < n:
                picked.append(items.pop(0))
    return picked


@pytest.fixture(scope="session")
def spec_bench_questions() -> list[dict]:
    if SPEC_BENCH.is_file():
        return [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]
    # Without the shared Spec-Bench file (a clone elsewhere), use our own prompts in the same categories.
    return json.loads((Path(__file__).parent / "data" / "prompts.json").read_text())


def random_llama(vocab_size: int = 16, hidden_size: int = 32, intermediate_size: int = 64, name: str = "tiny"):
    """A 2-layer random Llama (seed 0), peaked enough that drafts get accepted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from esp_engine.loader import LoadedModel
    from esp_engine.model import LlamaFamilyModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    model = LlamaFamilyModel(hf)
    return LoadedModel(name=name, model=model, tokenizer=None, eos_token_ids=(), max_model_len=256, source="")


def random_architecture(architecture: str, *, hidden_size: int = 64, intermediate_size: int = 128,
                        num_attention_heads: int = 4, head_dim: int = 16, max_position_embeddings: int = 64):
    """A 2-layer random transformers model of `architecture` (seed 0, 96 tokens, 2 key heads) whose
    norm weights and biases are random too, so that a dropped one shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(architecture, vocab_size=96, hidden_size=hidden_size,
                                  intermediate_size=intermediate_size, num_hidden_layers=2,
                                  num_attention_heads=num_attention_heads, num_key_value_heads=2, head_dim=head_dim,
                                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.5)
    return hf


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random Llama with a 16-token vocabulary: fast enough for statistics."""
    return random_llama()
