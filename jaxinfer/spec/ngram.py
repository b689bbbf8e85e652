"""Prompt-lookup (n-gram) drafting on the host: continue the context the way it continued before.

The longest suffix of the context (up to ``ngram_max`` tokens) that occurred earlier is looked up;
the tokens that followed each earlier occurrence, most recent first, become paths of the draft
tree (shared prefixes merged). Shorter suffixes fill the remaining budget. No model, no training:
it pays off where outputs repeat their input (code edits, summaries, extraction, lists).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jaxinfer.spec.tree import DraftTree, trie


class NgramDrafter:
    def __init__(self, ngram_max: int, depth: int, max_paths: int):
        self.ngram_max = ngram_max
        self.depth = depth
        self.max_paths = max_paths

    def propose(self, seqs, num_nodes: int) -> list[DraftTree]:
        return [self.propose_one(np.asarray(seq.tokens(0, seq.num_tokens), np.int32), num_nodes) for seq in seqs]

    def observe(self, seqs, result) -> None:
        """Nothing to learn from a verification round."""

    def propose_one(self, context: np.ndarray, num_nodes: int) -> DraftTree:
        """context [L] int32 (prompt + output; its last token is the root) -> a tree of at most num_nodes."""
        root = int(context[-1])
        paths: list[np.ndarray] = []
        seen: set[bytes] = set()
        for n in range(min(self.ngram_max, len(context) - 1), 0, -1):
            suffix = context[-n:]
            windows = sliding_window_view(context[:-1], n)  # occurrences that have a successor
            starts = np.flatnonzero(np.all(windows == suffix, axis=1))
            for start in starts[::-1]:
                path = context[start + n:start + n + self.depth]
                key = path.tobytes()
                if len(path) and key not in seen:
                    seen.add(key)
                    paths.append(path)
                if len(paths) >= self.max_paths:
                    break
            if len(paths) >= self.max_paths:
                break
        return trie(root, paths, num_nodes)
