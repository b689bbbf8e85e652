"""The fused draft-head round (jaxinfer.spec.round): the subtrees it picks on the device are the host
policy's (policy.select_tree, tree.pack), and its tree step equals the host-built one."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.spec.policy import RoundPolicy, select_tree
from jaxinfer.spec.round import select_subtrees
from jaxinfer.spec.tree import pack

TOP_K, DEPTH = 3, 4


def _candidates(rng, num_rows):
    """EAGLE-2 style candidates, level by level: k roots' children, then k*k children of the k best."""
    tokens, parents, scores, depths = [], [], [], []
    for _ in range(num_rows):
        t, p, s, d = list(rng.integers(5, 100, TOP_K)), [-1] * TOP_K, list(np.sort(-rng.random(TOP_K))[::-1]), \
            [1] * TOP_K
        frontier = list(range(TOP_K))
        for level in range(2, DEPTH + 1):
            base = len(t)
            for parent in frontier:
                for _ in range(TOP_K):
                    t.append(int(rng.integers(5, 100)))
                    p.append(parent)
                    s.append(s[parent] - float(rng.random()) * 2)  # a child never scores above its parent
                    d.append(level)
            layer = np.arange(base, len(t))
            frontier = list(layer[np.argsort(-np.asarray(s)[layer], kind="stable")[:TOP_K]])
        tokens.append(t), parents.append(p), scores.append(s), depths.append(d)
    return {"tokens": np.asarray(tokens, np.int32), "parents": np.asarray(parents, np.int32),
            "scores": np.asarray(scores, np.float32), "depths": np.asarray(depths, np.int32),
            "entropy": rng.random(num_rows).astype(np.float32) * 5}


@pytest.mark.parametrize("thresholds", [(), (1.0, 2.5, 4.0)])
def test_device_subtrees_are_the_host_policys(thresholds):
    rng = np.random.default_rng(0)
    num_rows, num_nodes = 6, 8
    variants = ((DEPTH - 1, num_nodes), (DEPTH, 5), (DEPTH, 6), (DEPTH - 1, 7))
    cand = _candidates(rng, num_rows)
    roots = rng.integers(5, 100, num_rows).astype(np.int32)
    limits = np.asarray([8, 8, 3, 1, 8, 0], np.int32)  # pages for fewer nodes; a bare root; a padding row
    policy = RoundPolicy(variants, thresholds)
    trees = []
    for row in range(num_rows - 1):
        depth, budget = policy.choose(float(cand["entropy"][row]))
        tree, _ = select_tree(int(roots[row]), cand["tokens"][row], cand["parents"][row], cand["scores"][row],
                              cand["depths"][row], depth, min(budget, limits[row], num_nodes))
        trees.append(tree)
    want = pack(trees, num_rows, num_nodes)
    tokens, parents, depths, mask, sizes = select_subtrees(
        {k: jnp.asarray(v) for k, v in cand.items()}, jnp.asarray(roots), jnp.asarray(limits), variants=variants,
        thresholds=thresholds, num_nodes=num_nodes, path_len=DEPTH + 1)
    np.testing.assert_array_equal(np.asarray(sizes), want.sizes)
    np.testing.assert_array_equal(np.asarray(tokens), want.tokens)
    np.testing.assert_array_equal(np.asarray(parents), want.parents)
    np.testing.assert_array_equal(np.asarray(depths), want.depths)
    np.testing.assert_array_equal(np.asarray(mask), want.mask)
    assert sizes[3] == 1 and sizes[5] == 0 and sizes.max() > 4
