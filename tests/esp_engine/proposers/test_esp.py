"""ESP tree construction, pruning, the dynamic budget and the mask-embedding EMA."""

import math

import pytest
import torch

from esp_engine.config import SpecConfig
from esp_engine.proposers.esp import EspProposer, dynamic_tree_candidates, insert_candidates, static_tree_candidates
from esp_engine.tree import DraftTree


def _logprobs(rows: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(rows))


# Vocabulary of 6. Mask 1 prefers 2 > 3 > 1 > 4; mask 2 prefers 2 > 5 > 0.
MASKS = _logprobs([
    [0.05, 0.15, 0.40, 0.25, 0.10, 0.05],
    [0.10, 0.05, 0.50, 0.05, 0.05, 0.25],
])


def test_static_tree_takes_top_k_under_the_best_parent():
    cands = static_tree_candidates(MASKS, root=0, widths=(2, 2))
    assert [(c.depth, c.token, c.parent) for c in cands] == [(1, 2, -1), (1, 3, -1), (2, 5, 0), (2, 0, 0)]
    # depth-2 children of token 2: token 2 itself is pruned (repeats its parent), 5 and 0 fill in
    assert cands[2].score == pytest.approx(math.log(0.40 * 0.25))


def test_pruning_skips_a_candidate_equal_to_the_root():
    cands = static_tree_candidates(MASKS, root=2, widths=(2, 1))
    assert [c.token for c in cands if c.depth == 1] == [3, 1]


def test_dynamic_tree_keeps_the_best_paths_within_budget():
    cands = dynamic_tree_candidates(MASKS, root=0, budget=3)
    # depth 1 offers 3 tokens (0.40, 0.25, 0.15), depth 2 offers 2 under token 2 (0.40*0.25=0.10, 0.40*0.10)
    assert [(c.depth, c.token) for c in cands] == [(1, 2), (1, 3), (1, 1)]
    cands = dynamic_tree_candidates(_logprobs([[0.0, 0.9, 0.05, 0.05], [0.0, 0.05, 0.9, 0.05]]), root=0, budget=2)
    assert [(c.depth, c.token, c.parent) for c in cands] == [(1, 1, -1), (2, 2, 0)]


def test_insert_candidates_builds_parent_rows():
    tree = DraftTree()
    rows = insert_candidates(tree, static_tree_candidates(MASKS, 0, (2, 2)), budget=10)
    assert rows == [1, 2, 3, 4] and tree.parents == [0, 0, 1, 1]
    small = DraftTree()
    insert_candidates(small, static_tree_candidates(MASKS, 0, (2, 2)), budget=3)
    assert small.num_nodes == 3


def test_ema_update_once_per_committed_token(tiny):
    model = tiny.model
    proposer = EspProposer(model, SpecConfig(method="esp", tree=(2,), ema_lambda=0.1))
    prompt = [1, 2, 3]
    embeds = model.embed(torch.tensor(prompt))
    proposer.begin(prompt, embeds)
    m0 = embeds.float().mean(0)
    assert torch.allclose(proposer.mask, m0)
    proposer.on_commit([4, 5])
    e = model.embed(torch.tensor([4, 5])).float()
    expected = m0 + 0.1 * (e[0] - m0)
    expected = expected + 0.1 * (e[1] - expected)
    assert torch.allclose(proposer.mask, expected, atol=1e-6)


def test_presets_match_the_paper():
    assert SpecConfig.from_preset("esp", "bc10").block_complexity == 10
    assert SpecConfig.from_preset("esp", "bc30").block_complexity == 30
    assert SpecConfig.from_preset("esp", "bc60").block_complexity == 60
    assert SpecConfig.from_preset("esp", "bc60").tree == (15, 4)
    assert SpecConfig.from_preset("lade", "bc30").block_complexity == 31
