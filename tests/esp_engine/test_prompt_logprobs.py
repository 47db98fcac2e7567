"""Scoring a prompt: log-probabilities of every prompt token, read off the prefill pass itself
(chunked or not), equal to a direct forward pass over the whole prompt."""

import pytest
import torch

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.errors import InvalidRequestError
from esp_engine.kv_cache import KVCache
from esp_engine.scheduler import SchedulerConfig


def _direct_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log p(prompt[i] | prompt[:i]) for i >= 1 from one forward pass over the prompt."""
    shape = model.shape
    cache = KVCache.standalone(shape.num_layers, shape.num_kv_heads, shape.head_dim, len(prompt), model.dtype)
    hidden = model(cache, model.embed(torch.tensor(prompt)), torch.arange(len(prompt)), None)
    logp = torch.log_softmax(model.logits(hidden), dim=-1)
    return logp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


def _score(engine: LLMEngine, prompt: list[int], **sampling):
    req = engine.add_request(prompt, SamplingParams(**sampling), SpecConfig.from_preset("hybrid", "bc30"))
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.req_id == req]
    return outputs


@pytest.fixture(scope="module")
def prompt(smol) -> list[int]:
    return smol.tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is")


def test_max_tokens_0_scores_the_prompt_in_chunks_and_generates_nothing(smol, prompt):
    # An 8-row pass budget prefills the prompt in several chunks; prefix caching is on and the
    # prompt was seen before, but scoring reads every prompt row, so the cache is not used.
    engine = LLMEngine(smol, scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8,
                                                              enable_prefix_caching=True))
    assert len(prompt) > 2 * 8 and len(prompt) > 16  # several chunks, and at least one whole cacheable block
    engine.generate(prompt, SamplingParams(max_new_tokens=2), SpecConfig(method="ar"))
    [out] = _score(engine, prompt, max_new_tokens=0, prompt_logprobs=3)
    assert out.finished and out.finish_reason == "length" and out.new_token_ids == [] and out.num_output_tokens == 0
    assert out.num_cached_tokens == 0
    entries = out.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    assert [e["token_id"] for e in entries[1:]] == prompt[1:]
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in entries[1:]]), _direct_logprobs(smol.model, prompt),
                               rtol=1e-4, atol=1e-4)
    for e in entries[1:]:
        tops = e["top"]
        assert len(tops) == 3 and [v for _, v in tops] == sorted((v for _, v in tops), reverse=True)
        assert e["logprob"] <= tops[0][1] + 1e-6  # no token beats the best alternative
        assert (e["rank"] == 1) == (e["token_id"] == tops[0][0])
    assert engine.stats().kv_cache_bytes == 0


def test_prompt_logprobs_come_with_the_first_output_and_change_nothing_generated(smol, smol_engine, prompt):
    plain = smol_engine.generate(prompt, SamplingParams(max_new_tokens=8), SpecConfig(method="ar")).output_ids
    outputs = _score(smol_engine, prompt, max_new_tokens=8, prompt_logprobs=0)
    assert [t for o in outputs for t in o.new_token_ids] == plain
    assert len(outputs[0].prompt_logprobs) == len(prompt) and all(e["top"] == [] for e in outputs[0].prompt_logprobs[1:])
    assert all(o.prompt_logprobs is None for o in outputs[1:])


def test_scoring_settings_are_checked():
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_new_tokens=-1)
