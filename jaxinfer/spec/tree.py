"""Draft trees on the host (no jax): the nodes a verification step checks, and their padding.

A tree is a list of nodes in topological order: node 0 is the root (the request's last sampled
token, whose KV is not yet computed) and every other node's parent comes before it. Node i's token
is a guess for the position ``committed + depth(i)``; siblings are distinct guesses for the same
position. Axis letters: B requests, N nodes (padded), D the deepest path.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD_TOKEN = -1  # token of padding nodes: equal to no sample, so never accepted


@dataclasses.dataclass(frozen=True)
class DraftTree:
    tokens: np.ndarray  # [n] int32, tokens[0] = the root
    parents: np.ndarray  # [n] int32, parents[0] = -1, parents[i] < i
    entropy: float = 0.0  # the HeteroSpec path entropy of the round (draft head only)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n < 1 or len(self.parents) != n or self.parents[0] != -1:
            raise ValueError(f"a draft tree needs a root and one parent per node, got {n} tokens, "
                             f"parents {self.parents!r}")
        if n > 1 and not np.all((self.parents[1:] >= 0) & (self.parents[1:] < np.arange(1, n))):
            raise ValueError(f"draft tree parents must precede their children, got {self.parents!r}")

    @classmethod
    def chain(cls, root: int, tokens) -> DraftTree:
        """A single path: root, tokens[0], tokens[1], ..."""
        n = len(tokens) + 1
        return cls(np.asarray([root, *tokens], np.int32), np.arange(-1, n - 1, dtype=np.int32))

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    def depths(self) -> np.ndarray:
        depth = np.zeros(self.num_nodes, np.int32)
        for i in range(1, self.num_nodes):
            depth[i] = depth[self.parents[i]] + 1
        return depth

    def prune(self, max_depth: int, max_nodes: int) -> DraftTree:
        """The first max_nodes nodes of depth <= max_depth (still a tree: parents come first and are
        never deeper than their children)."""
        keep = np.flatnonzero(self.depths() <= max_depth)[:max_nodes]
        if len(keep) == self.num_nodes:
            return self
        index = np.full(self.num_nodes, -1, np.int32)
        index[keep] = np.arange(len(keep), dtype=np.int32)
        parents = np.where(self.parents[keep] >= 0, index[np.maximum(self.parents[keep], 0)], -1)
        return DraftTree(self.tokens[keep], parents.astype(np.int32), self.entropy)

    def ancestors(self) -> np.ndarray:
        """[n, n] bool: [i, j] iff node j is node i or one of its ancestors."""
        mask = np.eye(self.num_nodes, dtype=bool)
        for i in range(1, self.num_nodes):
            mask[i] |= mask[self.parents[i]]
        return mask


def trie(root: int, paths, max_nodes: int) -> DraftTree:
    """Merge token paths (best first) into one tree under root, sharing common prefixes, with at most
    max_nodes nodes: a path that no longer fits is cut where the budget ends."""
    tokens, parents = [root], [-1]
    children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for path in paths:
        node = 0
        for token in path:
            child = children.get((node, int(token)))
            if child is None:
                if len(tokens) == max_nodes:
                    break
                child = len(tokens)
                tokens.append(int(token))
                parents.append(node)
                children[(node, int(token))] = child
            node = child
    return DraftTree(np.asarray(tokens, np.int32), np.asarray(parents, np.int32))


@dataclasses.dataclass(frozen=True)
class PackedTrees:
    """B trees padded to N nodes each: what a verification step takes (host arrays)."""

    tokens: np.ndarray  # [B, N] int32, PAD_TOKEN past each tree
    parents: np.ndarray  # [B, N] int32, -1 for roots and padding
    depths: np.ndarray  # [B, N] int32, 0 for padding
    mask: np.ndarray  # [B, N, N] bool ancestor-or-self; padding rows see no tree node
    sizes: np.ndarray  # [B] int32 real nodes per tree


def pack(trees: list[DraftTree], num_rows: int, num_nodes: int) -> PackedTrees:
    tokens = np.full((num_rows, num_nodes), PAD_TOKEN, np.int32)
    parents = np.full((num_rows, num_nodes), -1, np.int32)
    depths = np.zeros((num_rows, num_nodes), np.int32)
    mask = np.zeros((num_rows, num_nodes, num_nodes), bool)
    sizes = np.zeros(num_rows, np.int32)
    for row, tree in enumerate(trees):
        n = tree.num_nodes
        if n > num_nodes:
            raise ValueError(f"a draft tree of {n} nodes exceeds the verify budget of {num_nodes}")
        tokens[row, :n], parents[row, :n], depths[row, :n] = tree.tokens, tree.parents, tree.depths()
        mask[row, :n, :n] = tree.ancestors()
        sizes[row] = n
    return PackedTrees(tokens, parents, depths, mask, sizes)
