"""Acceptance and the KV commit of the accepted path against brute-force numpy."""

import jax.numpy as jnp
import numpy as np

from jaxinfer.layers.kv_pages import KVPages
from jaxinfer.spec.tree import DraftTree, pack
from jaxinfer.spec.verify import accept, commit_path


def _random_tree(rng, num_nodes, vocab):
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, num_nodes)]
    tokens = rng.integers(0, vocab, num_nodes)
    return DraftTree(tokens.astype(np.int32), np.asarray(parents, np.int32))


def _brute_force(tree, draws, node=0):
    """Walk from the root, descending into a child whose token equals the node's draw (siblings
    may repeat a token: the deepest such walk)."""
    children = [c for c in range(1, tree.num_nodes) if tree.parents[c] == node and tree.tokens[c] == draws[node]]
    return max(([node, *_brute_force(tree, draws, c)] for c in children), key=len, default=[node])


def test_accept_matches_a_walk_down_the_tree():
    rng = np.random.default_rng(0)
    vocab, num_nodes, rows = 3, 12, 64  # a small vocabulary makes long accepted paths common
    trees = [_random_tree(rng, int(rng.integers(1, num_nodes + 1)), vocab) for _ in range(rows)]
    packed = pack(trees, rows, num_nodes)
    draws = rng.integers(0, vocab, (rows, num_nodes)).astype(np.int32)
    path_len = num_nodes
    path, num_accepted = accept(jnp.asarray(packed.tokens), jnp.asarray(packed.parents), jnp.asarray(packed.depths),
                                jnp.asarray(packed.mask), jnp.asarray(draws), path_len)
    path, num_accepted = np.asarray(path), np.asarray(num_accepted)
    lengths = []
    for row, tree in enumerate(trees):
        expected = _brute_force(tree, draws[row])
        # siblings may repeat a token: any accepted path of the deepest length is right
        assert num_accepted[row] == len(expected) - 1
        got = path[row, :num_accepted[row] + 1].tolist()
        assert got[0] == 0 and all(tree.parents[b] == a for a, b in zip(got, got[1:], strict=False))
        assert all(tree.tokens[b] == draws[row, a] for a, b in zip(got, got[1:], strict=False))
        assert not path[row, num_accepted[row] + 1:].any()
        lengths.append(len(expected))
    assert max(lengths) >= 4 and min(lengths) == 1


def test_commit_path_moves_the_accepted_nodes_kv_in_every_layer():
    rng = np.random.default_rng(1)
    kv_heads, num_pages, page_size, dim, layers = 2, 10, 4, 3, 2
    k = rng.standard_normal((kv_heads, layers * num_pages, page_size, dim)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    pages = np.asarray([[7, 2, 5, 0], [3, 9, 1, 0]], np.int32)
    kv_lens = np.asarray([5, 2], np.int32)
    path = np.asarray([[0, 2, 5, 0], [0, 1, 0, 0]], np.int32)
    num_accepted = np.asarray([2, 0], np.int32)
    out = commit_path(KVPages(jnp.asarray(k), jnp.asarray(v), num_pages), jnp.asarray(pages), jnp.asarray(kv_lens),
                      jnp.asarray(path), jnp.asarray(num_accepted), num_layers=layers)
    expected_k, expected_v = k.copy(), v.copy()

    def loc(row, slot, layer):
        return pages[row, slot // page_size] + layer * num_pages, slot % page_size

    for layer in range(layers):
        for row in range(2):
            for level in range(num_accepted[row] + 1):
                src, dst = loc(row, kv_lens[row] + path[row, level], layer), loc(row, kv_lens[row] + level, layer)
                expected_k[:, dst[0], dst[1]] = k[:, src[0], src[1]]
                expected_v[:, dst[0], dst[1]] = v[:, src[0], src[1]]
    np.testing.assert_array_equal(np.asarray(out.k), expected_k)
    np.testing.assert_array_equal(np.asarray(out.v), expected_v)
