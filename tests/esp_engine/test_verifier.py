"""Verification walks the tree and commits accepted nodes plus one bonus token."""

import torch

from esp_engine.config import SamplingParams
from esp_engine.sampling import TokenChooser
from esp_engine.tree import DraftTree
from esp_engine.verifier import verify

V = 10


def _logits_choosing(tokens: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(tokens), V)
    for row, tok in enumerate(tokens):
        logits[row, tok] = 5.0
    return logits


def test_accepts_the_matching_path_and_adds_a_bonus():
    tree = DraftTree(tokens=[3, 4, 7, 8], parents=[0, 0, 1, 3])  # root->3->7->8, root->4
    # rows: root, 3, 4, 7, 8. The model picks 3 at the root, 7 after 3, then 2 (not 8)
    verdict = verify(tree, _logits_choosing([3, 7, 0, 2, 0]), TokenChooser(SamplingParams()))
    assert verdict.accepted_rows == [1, 3]
    assert verdict.committed == [3, 7, 2]
    assert verdict.deepest_row == 3


def test_first_mismatch_commits_only_the_bonus():
    tree = DraftTree(tokens=[3, 4], parents=[0, 0])
    verdict = verify(tree, _logits_choosing([9, 0, 0]), TokenChooser(SamplingParams()))
    assert verdict.accepted_rows == [] and verdict.committed == [9] and verdict.deepest_row == 0


def test_empty_tree_is_plain_decoding():
    verdict = verify(DraftTree(), _logits_choosing([6]), TokenChooser(SamplingParams()))
    assert verdict.committed == [6]
