"""HeteroSpec's round policy: bins, the verified subtree, and the regression-tree bin edges."""

import numpy as np
import pytest

from jaxinfer.config import SpeculativeConfig
from jaxinfer.spec.policy import RoundPolicy, fit_bins, select_tree


def test_bins_choose_deeper_drafts_and_smaller_budgets_for_low_entropy():
    policy = RoundPolicy.from_config(SpeculativeConfig(method="heterospec", depth=4, num_nodes=20,
                                                       thresholds=(0.5, 1.0, 1.5)))
    assert [policy.bin(h) for h in (0.1, 0.5, 0.7, 1.2, 1.6, 9.0)] == [0, 0, 1, 2, 3, 3]
    assert policy.choose(0.1) == (6, 8)  # alpha 2: depth 4 + 2, budget round(0.3 * 20) + 2
    assert policy.choose(0.7) == (5, 13)
    assert policy.choose(1.2) == (4, 20)
    assert policy.choose(5.0) == (4, 20)
    eagle = RoundPolicy.from_config(SpeculativeConfig(method="eagle", depth=4, num_nodes=20, thresholds=(0.5, 1, 2)))
    assert eagle.choose(0.0) == (4, 20)  # the fixed policy ignores entropy


def test_select_tree_takes_the_best_connected_candidates():
    # level 1: a b c; level 2: children of a (0) and of c (2)
    tokens = np.asarray([10, 11, 12, 20, 21, 22, 23], np.int32)
    parents = np.asarray([-1, -1, -1, 0, 0, 2, 2], np.int32)
    scores = np.asarray([-0.1, -2.0, -0.5, -0.3, -3.0, -0.6, -0.55])
    depths = np.asarray([1, 1, 1, 2, 2, 2, 2], np.int32)
    tree, chosen = select_tree(7, tokens, parents, scores, depths, max_depth=2, num_nodes=6)
    assert tree.tokens.tolist() == [7, 10, 12, 20, 22, 23]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2, 2]
    np.testing.assert_allclose(chosen, [-0.1, -0.5, -0.3, -0.6, -0.55])
    shallow, _ = select_tree(7, tokens, parents, scores, depths, max_depth=1, num_nodes=6)
    assert shallow.tokens.tolist() == [7, 10, 11, 12]


def test_fit_bins_recovers_the_edges_of_a_step_function():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 4, 4000)
    y = np.floor(x) * 10 + rng.normal(0, 1, x.size)  # steps at 1, 2, 3
    for weighted in (False, True):
        splits = fit_bins(x, y, weighted=weighted)
        assert 3 <= len(splits) <= 7 and list(splits) == sorted(splits)
        for edge in (1.0, 2.0, 3.0):
            assert min(abs(s - edge) for s in splits) < 0.05, (weighted, splits)
    assert fit_bins(np.ones(100), np.arange(100.0)) == ()  # one entropy value: nothing to split


def test_heterospec_config_validation():
    with pytest.raises(ValueError, match="increasing"):
        SpeculativeConfig(method="heterospec", thresholds=(2.0, 1.0, 3.0))
    with pytest.raises(ValueError, match="calibrate"):
        RoundPolicy.from_config(SpeculativeConfig(method="heterospec"))
