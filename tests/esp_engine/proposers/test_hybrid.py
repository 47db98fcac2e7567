"""Hybrid drafts PLD's chain and ESP's candidates in one tree; under any node cap the chain,
which is accepted far more often than a mask guess, keeps at least what PLD alone would draft."""

import torch

from esp_engine.config import SpecConfig
from esp_engine.cost_model import LoadTuner, PassFeedback, SequenceFeedback, StepCostModel
from esp_engine.proposers.base import DraftBudget
from esp_engine.proposers.hybrid import MASKS_ONLY, HybridProposer
from esp_engine.proposers.pld import PldProposer

# "5 6 7" occurred before, followed by 8 9 10 11 12 13: the suffix "5 6 7" matches it.
CONTEXT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 1, 5, 6, 7]
CHAIN = [8, 9, 10, 11, 12, 13, 1, 5, 6, 7]


def _hybrid(tiny) -> HybridProposer:
    spec = SpecConfig.from_preset("hybrid", "bc30")  # node budget 14, chain up to 10, ESP keeps 4
    proposer = HybridProposer(tiny.model, spec)
    proposer.begin(CONTEXT, tiny.model.embed(torch.tensor(CONTEXT)))
    # Mask guesses that all differ from the chain's first token.
    proposer.on_prefill(torch.tensor([[0.0] * 8 + [-9.0] + [0.0] * 7]))
    return proposer


def _chain_in(draft) -> list[int]:
    """The tokens on the path from the root through first children that follow CHAIN."""
    tree, row, path = draft.tree, 0, []
    children = tree.children_map()
    for token in CHAIN:
        if token not in children[row]:
            break
        row = children[row][token]
        path.append(token)
    return path


def test_the_tree_holds_the_whole_chain_and_esp_candidates(tiny):
    draft = _hybrid(tiny).propose(CONTEXT, max_nodes=30)
    assert _chain_in(draft) == CHAIN
    assert draft.tree.num_nodes == 14 and draft.num_masks == 1


def test_under_a_node_cap_the_chain_comes_first(tiny):
    pld = PldProposer(tiny.model, SpecConfig.from_preset("pld", "bc30"))
    for cap in (1, 3, 6, 9):
        draft = _hybrid(tiny).propose(CONTEXT, max_nodes=cap)
        assert _chain_in(draft) == CHAIN[:cap] == _chain_in(pld.propose(CONTEXT, max_nodes=cap))
        assert draft.tree.num_nodes == cap


def test_without_a_match_esp_takes_the_whole_budget(tiny):
    draft = _hybrid(tiny).propose([1, 2, 3, 4], max_nodes=30)
    assert draft.tree.num_nodes == 14 and all(p == 0 for p in draft.tree.parents)


def test_under_a_cap_without_a_chain_it_drafts_masks_only_where_they_paid(tiny):
    costs = StepCostModel(rows=[1, 4, 10, 30], seconds=[0.0145, 0.0167, 0.0213, 0.037])  # a CPU: rows cost
    tuner = LoadTuner(costs)
    proposer = HybridProposer(tiny.model, SpecConfig.from_preset("hybrid", "bc30"))
    context = list(range(12))  # twelve distinct tokens: nothing to copy
    proposer.begin(context, tiny.model.embed(torch.tensor(context)))
    assert not proposer.chains(context)
    capped = DraftBudget(8, 19, tuner.pays_alone)
    assert proposer.fit(context, capped)[1]  # nothing known yet: masks get their try
    assert proposer.tuner_keys(proposer.draft(context, capped), capped) == ("hybrid", MASKS_ONLY)
    for _ in range(50):  # 10% more tokens for 30% more time
        tuner.observe(PassFeedback(1, 8, True, None, 1, [SequenceFeedback((MASKS_ONLY,), 8, 1.1, 8)]))
    assert not proposer.fit(context, capped)[1]  # seen not to pay: no mask rows
    assert proposer.fit(context, DraftBudget(30, 19, tuner.pays_alone))[1]  # the whole preset is no cap: masks as usual
