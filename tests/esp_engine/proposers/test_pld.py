"""Prompt lookup finds the latest earlier match of the longest suffix n-gram."""

import numpy as np

from esp_engine.proposers.pld import find_ngram_drafts


def test_longest_suffix_match_wins():
    ctx = np.array([1, 2, 3, 9, 9, 5, 2, 3, 8, 7, 1, 2, 3])
    # suffix [1,2,3] occurs at 0 -> continuation 9 9 5 ...
    assert find_ngram_drafts(ctx, 3, 1, 4) == [[9, 9, 5, 2]]


def test_latest_occurrence_first_and_distinct_candidates():
    ctx = np.array([4, 5, 6, 4, 7, 1, 4, 5, 6, 4])
    assert find_ngram_drafts(ctx, 1, 1, 2, num_candidates=1) == [[5, 6]]  # suffix [4] latest at 6
    assert find_ngram_drafts(ctx, 1, 1, 2, num_candidates=3) == [[5, 6], [7, 1]]  # 3rd shares first token


def test_falls_back_to_shorter_ngrams_and_to_nothing():
    ctx = np.array([8, 1, 2, 9, 3, 2])
    assert find_ngram_drafts(ctx, 3, 1, 3) == [[9, 3, 2]]
    assert find_ngram_drafts(np.array([1, 2, 3]), 3, 1, 3) == []
    assert find_ngram_drafts(np.array([1, 2, 3]), 3, 2, 3) == []


def test_continuation_is_capped_by_context_end():
    ctx = np.array([5, 6, 5])
    assert find_ngram_drafts(ctx, 2, 1, 10) == [[6, 5]]
