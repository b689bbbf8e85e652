"""HeteroSpec's round policy (host only, no jax): entropy bins, the verified subtree, and fitting the
bin edges offline.

A round's path entropy H* (cumulative top-K entropy of the draft's most confident path at the base
depth) falls into one of the bins cut by thresholds s0 < s1 < s2 (the upper edges of the three
lowest of the 8 bins of a depth-3 regression tree). Bin i <= 2 (an easy context) drafts deeper
and verifies fewer nodes: depth d + (alpha - i), budget round(gamma_i N) + (alpha - i); higher
entropy keeps the defaults (d, N). The verified subtree is the budget's best candidates by path
score (EAGLE-2 reranking), which is connected because a child never scores above its parent.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from jaxinfer.config import SpeculativeConfig
from jaxinfer.spec.tree import DraftTree


@dataclasses.dataclass(frozen=True)
class RoundPolicy:
    variants: tuple[tuple[int, int], ...]  # (depth, budget): default, then bins 0, 1, 2
    thresholds: tuple[float, ...] = ()  # () = always the default

    @classmethod
    def from_config(cls, config: SpeculativeConfig) -> RoundPolicy:
        if config.method == "heterospec" and not config.thresholds:
            raise ValueError("heterospec needs entropy bin thresholds: run launch/calibrate_spec.py for the draft "
                             "head, or set thresholds")
        return cls(config.variants(), config.thresholds if config.method == "heterospec" else ())

    def bin(self, entropy: float) -> int:
        """0, 1, 2 for the low-entropy bins, 3 for the rest (the default)."""
        return bisect.bisect_left(self.thresholds, entropy) if self.thresholds else 3

    def choose(self, entropy: float) -> tuple[int, int]:
        index = self.bin(entropy)
        return self.variants[0] if index >= 3 else self.variants[1 + index]


def select_tree(root: int, tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray, depths: np.ndarray,
                max_depth: int, num_nodes: int, entropy: float = 0.0) -> tuple[DraftTree, np.ndarray]:
    """The num_nodes - 1 best candidates (by score, ties to the earlier) of depth <= max_depth under
    root. Candidates come level by level with parents (-1 = root) before children. Returns the tree
    and the chosen candidates' scores (node order, root excluded)."""
    eligible = np.flatnonzero(depths <= max_depth)
    order = eligible[np.lexsort((eligible, -scores[eligible]))][:num_nodes - 1]
    chosen = np.sort(order)
    position = {int(c): i + 1 for i, c in enumerate(chosen)}
    tree_parents = [-1] + [position.get(int(parents[c]), 0) if parents[c] >= 0 else 0 for c in chosen]
    if any(parents[c] >= 0 and int(parents[c]) not in position for c in chosen):
        raise AssertionError("selected candidates are not closed under parents")
    tree = DraftTree(np.asarray([root, *tokens[chosen]], np.int32), np.asarray(tree_parents, np.int32), entropy)
    return tree, scores[chosen]


def fit_bins(entropy: np.ndarray, target: np.ndarray, depth: int = 3, min_leaf: float = 0.05,
             weighted: bool = False) -> tuple[float, ...]:
    """Depth-3 regression tree on one feature (HeteroSpec Eq. 2): each split minimizes the sum of the
    two sides' variances (weighted=True: the sides' squared errors, as CART usually does). Returns
    the sorted split points (up to 2^depth - 1); the first three are s0, s1, s2."""
    order = np.argsort(entropy, kind="stable")
    x, y = np.asarray(entropy, np.float64)[order], np.asarray(target, np.float64)[order]
    leaf = max(2, int(min_leaf * len(x)))
    splits: list[float] = []

    def grow(lo: int, hi: int, level: int) -> None:
        if level == depth or hi - lo < 2 * leaf:
            return
        seg = y[lo:hi]
        n = np.arange(1, len(seg) + 1, dtype=np.float64)
        csum, csq = np.cumsum(seg), np.cumsum(seg * seg)
        total, total_sq = csum[-1], csq[-1]
        left_var = csq / n - (csum / n) ** 2
        right_n = len(seg) - n
        with np.errstate(divide="ignore", invalid="ignore"):
            right_var = (total_sq - csq) / right_n - ((total - csum) / right_n) ** 2
        cost = left_var * n + right_var * right_n if weighted else left_var + right_var
        cut = np.arange(len(seg) - 1)
        ok = (cut + 1 >= leaf) & (len(seg) - cut - 1 >= leaf) & (x[lo + cut] < x[lo + cut + 1])
        if not ok.any():
            return
        best = int(cut[ok][np.argmin(cost[:-1][ok])])
        splits.append(float((x[lo + best] + x[lo + best + 1]) / 2))
        grow(lo, lo + best + 1, level + 1)
        grow(lo + best + 1, hi, level + 1)

    grow(0, len(x), 0)
    return tuple(sorted(splits))
