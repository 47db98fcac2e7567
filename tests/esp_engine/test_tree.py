"""Block layout: positions and attention of a hand-checked tree, masks and lookahead rows."""

import torch

from esp_engine.tree import DraftTree, block_layout


def test_tree_merges_equal_children_and_keeps_parents_first():
    tree = DraftTree()
    a = tree.add(0, 5)
    assert tree.add(0, 5) == a
    end = tree.add_chain(0, [5, 6, 7], budget=10)
    assert tree.tokens == [5, 6, 7] and tree.parents == [0, 1, 2] and end == 3
    tree.add_chain(0, [5, 9], budget=10)
    assert tree.tokens == [5, 6, 7, 9] and tree.parents == [0, 1, 2, 1]
    assert tree.children_map()[1] == {6: 2, 9: 4}


def test_chain_stops_at_budget():
    tree = DraftTree()
    tree.add_chain(0, [1, 2, 3, 4], budget=2)
    assert tree.tokens == [1, 2]


def test_hand_checked_layout_with_one_mask():
    # root(0) -> a(1), b(2); a -> c(3). k = 1 mask per tree row.
    layout = block_layout((0, 0, 1), num_masks=1)
    assert layout.num_rows == 8
    # Tree positions by depth, then mask j of owner b at depth(b) + j.
    assert layout.offsets.tolist() == [0, 1, 1, 2, 1, 2, 2, 3]
    attn = layout.attn.int().tolist()
    expected = [
        # r a b c | m0 ma mb mc
        [1, 0, 0, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0, 0, 0],  # a
        [1, 0, 1, 0, 0, 0, 0, 0],  # b: sibling of a, does not see a
        [1, 1, 0, 1, 0, 0, 0, 0],  # c
        [1, 0, 0, 0, 1, 0, 0, 0],  # mask of root
        [1, 1, 0, 0, 0, 1, 0, 0],  # mask of a
        [1, 0, 1, 0, 0, 0, 1, 0],  # mask of b
        [1, 1, 0, 1, 0, 0, 0, 1],  # mask of c
    ]
    assert attn == expected
    assert layout.mask_rows.tolist() == [4, 5, 6, 7]
    assert layout.owner_mask_rows(3) == slice(7, 8)


def test_two_masks_see_their_earlier_sibling_masks():
    layout = block_layout((0,), num_masks=2)  # root, a; masks: root m1 m2, a m1 m2
    assert layout.offsets.tolist() == [0, 1, 1, 2, 2, 3]
    attn = layout.attn
    # a's second mask sees root, a, a's first mask and itself; nothing of the root's masks.
    assert attn[5].nonzero().flatten().tolist() == [0, 1, 4, 5]
    # no real token attends to any mask, so masks never change verification
    assert not attn[:2, 2:].any()


def test_no_row_is_fully_masked_and_layout_is_cached():
    layout = block_layout((0, 1, 1, 0), num_masks=2, lookahead=(2, 3))
    assert bool(layout.attn.any(dim=1).all())
    assert block_layout((0, 1, 1, 0), num_masks=2, lookahead=(2, 3)) is layout


def test_lookahead_window_positions_and_attention():
    layout = block_layout((), num_masks=0, lookahead=(2, 3))  # root + 2 rows x 3 columns
    start = layout.lookahead_start
    assert start == 1
    assert layout.offsets.tolist() == [0, 1, 2, 3, 2, 3, 4]
    # row 1, column 2 sees root, row 0 columns 0..2 and itself
    row = start + 1 * 3 + 2
    assert layout.attn[row].nonzero().flatten().tolist() == [0, 1, 2, 3, row]
    assert layout.lookahead_row(1) == slice(4, 7)
    assert layout.attn.dtype == torch.bool
