"""Engine behaviour: stops inside accepted runs, bad input, request lifecycle."""

import pytest
import torch

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.errors import ContextLengthError, InvalidRequestError
from esp_engine.model_runner import DecodeOutcome, SequenceResult, StepResult
from esp_engine.outputs import RequestOutput
from esp_engine.proposers.base import Draft, DraftBudget
from esp_engine.proposers.hybrid import HybridProposer
from esp_engine.proposers.pld import PldProposer
from esp_engine.tree import DraftTree, block_layout
from esp_engine.verifier import Verdict

PROMPT = [1, 2, 3, 4, 5, 1, 2, 3, 4, 6, 1, 2]


def _commit(engine: LLMEngine, tokens: list[int], **sampling) -> tuple[list[int], RequestOutput]:
    """Prefill a request, then hand the scheduler a decode pass that chose `tokens`: what it
    commits is what a verified run of those tokens would commit."""
    req_id = engine.add_request(PROMPT, SamplingParams(**sampling), SpecConfig(method="ar"))
    first = engine.step()[0].new_token_ids  # prefill commits the first token
    plan = engine.scheduler.schedule()
    [slot] = plan.decode
    layout = block_layout((), 0)
    decode = DecodeOutcome(Draft(DraftTree()), layout, Verdict([], tokens), slot.budget.max_rows)
    [out] = engine.scheduler.update(plan, StepResult([SequenceResult(req_id, tokens, decode=decode)], 1, False))
    return first, out


def test_stop_token_inside_an_accepted_run_discards_the_rest(tiny):
    engine = LLMEngine(tiny)
    first, out = _commit(engine, [7, 8, 9, 10, 11], max_new_tokens=50, stop_token_ids=(9,))
    assert out.new_token_ids == [7, 8] and out.finished and out.finish_reason == "stop"
    assert out.stop_token_id == 9 and out.num_output_tokens == len(first) + 2
    assert out.step.num_committed == 3  # the stop token counts as generated, as in the usage
    assert not engine.has_unfinished() and engine.stats().kv_cache_bytes == 0  # its KV blocks are back


def test_max_new_tokens_inside_an_accepted_run(tiny):
    _, out = _commit(LLMEngine(tiny), [7, 8, 9, 10], max_new_tokens=3)
    assert out.new_token_ids == [7, 8] and out.finish_reason == "length" and out.num_output_tokens == 3


def test_eos_stops_unless_ignored(tiny):
    tiny_eos = type(tiny)(**{**tiny.__dict__, "eos_token_ids": (8,)})
    _, out = _commit(LLMEngine(tiny_eos), [7, 8, 9], max_new_tokens=50)
    assert out.new_token_ids == [7] and out.stop_token_id == 8
    _, out = _commit(LLMEngine(tiny_eos), [7, 8, 9], max_new_tokens=50, ignore_eos=True)
    assert out.new_token_ids == [7, 8, 9] and not out.finished


def test_end_to_end_stops_match_plain_decoding(smol, smol_engine):
    from tests.conftest import chat_ids

    prompt = chat_ids(smol.tokenizer, "List the numbers from 1 to 30, separated by commas.")
    plain = smol_engine.generate(prompt, SamplingParams(max_new_tokens=40), SpecConfig(method="ar")).output_ids
    stop = plain[20]
    cut = plain.index(stop)
    for method, preset in [("ar", None), ("pld", "bc10"), ("hybrid", "bc30"), ("esp", "bc30")]:
        spec = SpecConfig.from_preset(method, preset)
        stopped = smol_engine.generate(prompt, SamplingParams(max_new_tokens=40, stop_token_ids=(stop,)), spec)
        assert stopped.output_ids == plain[:cut] and stopped.finish_reason == "stop"
        capped = smol_engine.generate(prompt, SamplingParams(max_new_tokens=13), spec)
        assert capped.output_ids == plain[:13] and capped.finish_reason == "length"


def test_bad_requests_raise_clear_errors(tiny):
    engine = LLMEngine(tiny)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ContextLengthError, match="maximum context length is 256"):
        engine.add_request([1] * 250, SamplingParams(max_new_tokens=10))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request([1, 99], SamplingParams())
    assert not engine.has_unfinished()


def test_abort_frees_the_sequence(tiny):
    engine = LLMEngine(tiny)
    req_id = engine.add_request(PROMPT, SamplingParams(max_new_tokens=50), SpecConfig.from_preset("pld", "bc10"))
    engine.step()
    assert engine.stats().kv_cache_bytes > 0 and engine.stats().num_running == 1
    assert engine.abort_request(req_id) and not engine.abort_request(req_id)
    assert engine.stats().kv_cache_bytes == 0 and not engine.has_unfinished()


def test_a_request_id_in_use_is_refused(tiny):
    engine = LLMEngine(tiny)
    engine.add_request(PROMPT, SamplingParams(), req_id="a")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(PROMPT, SamplingParams(), req_id="a")


def test_step_interleaves_requests_until_all_finish(tiny):
    engine = LLMEngine(tiny)
    ids = [engine.add_request(PROMPT, SamplingParams(max_new_tokens=n), SpecConfig.from_preset(m, "bc10"))
           for n, m in ((5, "esp"), (9, "pld"), (3, "lade"))]
    received = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            received[out.req_id].extend(out.new_token_ids)
    assert [len(received[i]) for i in ids] == [5, 9, 3]


def test_a_failing_request_ends_alone_and_frees_its_cache(tiny, monkeypatch):
    engine = LLMEngine(tiny)
    good = engine.add_request(PROMPT, SamplingParams(max_new_tokens=6), SpecConfig.from_preset("esp", "bc10"))
    bad = engine.add_request(PROMPT, SamplingParams(max_new_tokens=6), SpecConfig.from_preset("pld", "bc10"))

    def broken(*args, **kwargs):
        raise ValueError("proposer exploded")

    monkeypatch.setattr(PldProposer, "propose", broken)
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.req_id] = out
    assert finished[bad].finish_reason == "error"
    assert isinstance(finished[bad].error, ValueError) and str(finished[bad].error) == "proposer exploded"
    assert finished[good].finish_reason == "length" and finished[good].num_output_tokens == 6
    assert engine.stats().kv_cache_bytes == 0


def test_long_generations_grow_the_cache(tiny, monkeypatch):
    from esp_engine.kv_cache import KVCache

    monkeypatch.setattr(KVCache, "GROWTH_CHUNK", 16)  # start small: the cache must grow several times
    grown = []
    real_ensure = KVCache.ensure
    monkeypatch.setattr(KVCache, "ensure", lambda self, n: (grown.append(n > self.capacity), real_ensure(self, n)))
    engine = LLMEngine(tiny)
    plain = engine.generate(PROMPT, SamplingParams(max_new_tokens=200, ignore_eos=True), SpecConfig(method="ar"))
    spec = engine.generate(PROMPT, SamplingParams(max_new_tokens=200, ignore_eos=True), SpecConfig.from_preset("lade", "bc30"))
    assert len(plain.output_ids) == 200 and spec.output_ids == plain.output_ids
    assert sum(grown) >= 4


def test_concurrent_requests_share_passes_and_match_their_solo_outputs(smol, smol_engine):
    from tests.conftest import chat_ids

    texts = ["Name three rivers.", "What is 12 times 7?", "Write one line about cats.",
             "Translate 'good morning' into French.", "List two prime numbers.", "Say hello."]
    settings = [("ar", None, 12, ()), ("esp", "bc10", 20, ()), ("pld", "bc30", 16, ()),
                ("lade", "bc10", 24, ()), ("hybrid", "bc30", 20, ()), ("esp", "auto", 8, ())]
    prompts = [chat_ids(smol.tokenizer, t) for t in texts]
    solo = [smol_engine.generate(p, SamplingParams(max_new_tokens=n), SpecConfig(method="ar")).output_ids
            for p, (_, _, n, _) in zip(prompts, settings)]
    engine = LLMEngine(smol)
    ids = []
    for i, (prompt, (method, preset, n, _)) in enumerate(zip(prompts, settings)):
        stop = (solo[i][5],) if i == 2 else ()  # one request stops on a token id mid-run
        ids.append(engine.add_request(prompt, SamplingParams(max_new_tokens=n, stop_token_ids=stop),
                                      SpecConfig.from_preset(method, preset)))
    received = {i: [] for i in ids}
    batch_sizes = []
    while engine.has_unfinished():
        outs = engine.step()
        batch_sizes.append(len(outs))
        for out in outs:
            received[out.req_id].extend(out.new_token_ids)
    for i, req_id in enumerate(ids):
        expected = solo[i][: solo[i].index(solo[i][5])] if i == 2 else solo[i]
        assert received[req_id] == expected, settings[i]
    assert max(batch_sizes) == len(ids)  # all six decoded in one pass at some step


def test_a_row_cap_shrinks_trees_as_the_batch_grows_and_stays_lossless(tiny):
    solo = LLMEngine(tiny)
    expected = solo.generate(PROMPT, SamplingParams(max_new_tokens=12), SpecConfig(method="ar")).output_ids
    engine = LLMEngine(tiny, max_rows_per_step=12)
    specs = [SpecConfig.from_preset("esp", "bc30"), SpecConfig.from_preset("pld", "bc30"),
             SpecConfig.from_preset("hybrid", "bc30")]
    ids = [engine.add_request(PROMPT, SamplingParams(max_new_tokens=12), spec) for spec in specs]
    received = {i: [] for i in ids}
    rows_when_all_three_decode = []
    while engine.has_unfinished():
        outs = engine.step()
        for out in outs:
            received[out.req_id].extend(out.new_token_ids)
            if out.step is not None and len(outs) == 3:
                rows_when_all_three_decode.append(out.step.block_rows)
    assert all(received[i] == expected for i in ids)
    assert rows_when_all_three_decode and max(rows_when_all_three_decode) <= 12 // 3  # each one's share of the cap


def test_hybrid_short_of_rows_gives_them_all_to_its_chain_without_masks(tiny):
    proposer = HybridProposer(tiny.model, SpecConfig.from_preset("hybrid", "bc30"))
    matching = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]  # "1 2 3" occurred before: PLD has a chain
    proposer.begin(matching, tiny.model.embed(torch.tensor(matching)))
    assert proposer.fit(matching, DraftBudget(8, 29)) == (7, False)  # the chain takes all 8 rows, no masks
    assert proposer.fit(matching, DraftBudget(30, 29)) == (29, True)  # room for the whole block: masks as usual
    fresh = [5, 9, 2, 7]  # no earlier occurrence of its suffix: ESP's masked tree
    assert proposer.fit(fresh, DraftBudget(8, 29)) == (3, True)
    draft = proposer.draft(matching, DraftBudget(8, 29))
    assert draft.num_masks == 0 and draft.tree.tokens[:4] == [4, 5, 6, 7]  # the copied chain, as far as it fits


def test_decode_steps_run_plain_on_a_cpu_and_padded_when_asked_with_the_same_tokens(smol, smol_engine):
    from esp_engine.model_runner import ModelRunner
    from esp_engine.padded_runner import PaddedModelRunner
    from tests.conftest import chat_ids

    assert type(smol_engine.runner) is ModelRunner  # auto: padding rows cost on a CPU
    padded = LLMEngine(smol, runner="padded")
    assert isinstance(padded.runner, PaddedModelRunner)
    prompt = chat_ids(smol.tokenizer, "Name three rivers in Europe.")
    params, spec = SamplingParams(max_new_tokens=16), SpecConfig.from_preset("esp", "bc10")
    assert padded.generate(prompt, params, spec).output_ids == smol_engine.generate(prompt, params, spec).output_ids
    assert padded.runner.padded_passes > 0
    with pytest.raises(ValueError, match="unknown runner"):
        LLMEngine(smol, runner="graphs")
