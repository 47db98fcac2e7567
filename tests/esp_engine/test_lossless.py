"""Greedy output of every method and preset equals plain greedy decoding, token for token.

Real model (the embedded SmolLM2-135M-Instruct, float32, CPU), real Spec-Bench prompts from
every category.
"""

import pytest

from esp_engine.config import SamplingParams, SpecConfig, preset_names
from tests.conftest import chat_ids, round_robin

NUM_PROMPTS = 20
MAX_NEW_TOKENS = 32
CONFIGS = [(m, p) for m in ("esp", "pld", "lade", "hybrid") for p in preset_names(m)]


@pytest.fixture(scope="module")
def prompts(smol, spec_bench_questions):
    return [chat_ids(smol.tokenizer, q["turns"][0]) for q in round_robin(spec_bench_questions, NUM_PROMPTS)]


@pytest.fixture(scope="module")
def reference(smol_engine, prompts):
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    return [smol_engine.generate(p, params, SpecConfig(method="ar")) for p in prompts]


@pytest.mark.parametrize("method, preset", CONFIGS, ids=[f"{m}-{p}" for m, p in CONFIGS])
def test_greedy_equals_plain_decoding(smol_engine, prompts, reference, method, preset):
    spec = SpecConfig.from_preset(method, preset)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    decode_tokens = decode_calls = 0
    for prompt, ref in zip(prompts, reference):
        result = smol_engine.generate(prompt, params, spec)
        assert result.output_ids == ref.output_ids
        assert result.finish_reason == ref.finish_reason
        decode_tokens += result.num_decode_tokens
        decode_calls += result.num_decode_calls
    # Speculation must have committed more than one token per pass somewhere, or nothing was tested.
    assert decode_tokens > decode_calls
