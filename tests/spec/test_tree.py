"""Draft trees, their packing and the n-gram drafter (host only)."""

import numpy as np
import pytest

from jaxinfer.spec.ngram import NgramDrafter
from jaxinfer.spec.tree import PAD_TOKEN, DraftTree, pack, trie


def test_chain_depths_and_ancestors():
    tree = DraftTree.chain(9, [4, 5, 6])
    assert tree.tokens.tolist() == [9, 4, 5, 6] and tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.depths().tolist() == [0, 1, 2, 3]
    assert np.array_equal(tree.ancestors(), np.tril(np.ones((4, 4), bool)))


def test_trie_merges_shared_prefixes_and_respects_the_budget():
    tree = trie(1, [[2, 3, 4], [2, 3, 5], [6]], max_nodes=10)
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 2, 0]
    assert tree.depths().tolist() == [0, 1, 2, 3, 3, 1]
    anc = tree.ancestors()
    assert anc[4].tolist() == [True, True, True, False, True, False]  # 5's ancestors: 1, 2, 3
    cut = trie(1, [[2, 3, 4], [7, 8]], max_nodes=4)
    assert cut.tokens.tolist() == [1, 2, 3, 4]  # the second path no longer fits


@pytest.mark.parametrize("parents", [[0, 0], [-1, 1], [-1, 0, 3, 1]])
def test_invalid_trees_are_refused(parents):
    with pytest.raises(ValueError, match="parent"):
        DraftTree(np.zeros(len(parents), np.int32), np.asarray(parents, np.int32))


def test_pack_pads_nodes_and_rows():
    packed = pack([DraftTree.chain(3, [4]), trie(5, [[6], [7, 8]], 8)], num_rows=3, num_nodes=5)
    assert packed.sizes.tolist() == [2, 4, 0]
    assert packed.tokens[0].tolist() == [3, 4, PAD_TOKEN, PAD_TOKEN, PAD_TOKEN]
    assert packed.parents[1].tolist() == [-1, 0, 0, 2, -1]
    assert packed.depths[1].tolist() == [0, 1, 1, 2, 0]
    assert not packed.mask[0, 2:].any() and not packed.mask[2].any()
    with pytest.raises(ValueError, match="exceeds the verify budget"):
        pack([DraftTree.chain(1, [2, 3, 4])], num_rows=1, num_nodes=3)


def test_ngram_drafter_continues_the_most_recent_longest_match():
    drafter = NgramDrafter(ngram_max=3, depth=3, max_paths=4)
    context = np.asarray([1, 2, 3, 4, 9, 1, 2, 3, 7, 8, 2, 3], np.int32)
    tree = drafter.propose_one(context, num_nodes=16)
    # suffix [2, 3] was followed by 7 8 2 (most recent) and by 4 9 1; suffix [3] adds nothing new
    assert tree.tokens[0] == 3
    paths = {tuple(tree.tokens[[i for i in range(tree.num_nodes) if tree.ancestors()[leaf, i]]][1:])
             for leaf in range(tree.num_nodes) if leaf not in tree.parents}
    assert paths == {(7, 8, 2), (4, 9, 1)}
    assert tree.tokens[1] == 7  # the most recent continuation first
    assert drafter.propose_one(np.asarray([5, 6, 7], np.int32), 16).num_nodes == 1  # nothing repeats: root only


def test_prune_keeps_a_tree_within_depth_and_size():
    tree = trie(1, [[2, 3, 4], [2, 5], [6, 7]], max_nodes=10)  # nodes 1 2 3 4 | 5 | 6 7
    cut = tree.prune(max_depth=2, max_nodes=10)
    assert cut.tokens.tolist() == [1, 2, 3, 5, 6, 7] and cut.parents.tolist() == [-1, 0, 1, 1, 0, 4]
    assert tree.prune(max_depth=1, max_nodes=2).tokens.tolist() == [1, 2]
    assert tree.prune(5, 10) is tree
