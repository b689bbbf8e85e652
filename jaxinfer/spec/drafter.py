"""The EAGLE draft-head drafter (host side): one jitted drafting call per round, then the round
policy (fixed EAGLE-2, or HeteroSpec's entropy bins) picks each request's verified subtree.

With ``record=True`` it also keeps, per verified round, what calibration needs: the path entropy
H*, the terminal confidence rank (rank by path score, among the verified nodes, of the last
accepted node; 0 = the best) and the accepted length.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.buckets import bucket
from jaxinfer.config import SchedulerConfig, SpeculativeConfig
from jaxinfer.engine.sequence import Sequence
from jaxinfer.spec.batch import DraftShape, build_draft_input
from jaxinfer.spec.policy import RoundPolicy, select_tree
from jaxinfer.spec.programs import DraftProgram, RoundProgram
from jaxinfer.spec.round import RoundResult, RoundShape, build_round_input
from jaxinfer.spec.tree import DraftTree


class EagleDrafter:
    def __init__(self, config: SpeculativeConfig, scheduler_config: SchedulerConfig, runner, row_buckets,
                 record: bool = False):
        self.config = config
        self.runner = runner
        self.policy = RoundPolicy.from_config(config)
        # levels drafted: as deep as a round verifies; with entropy bins at least the base depth, where H*
        # is taken
        reach = config.verified_depth()
        self.depth = max(reach, config.depth) if self.policy.thresholds else reach
        self.base_depth = min(config.depth, self.depth)
        self.row_buckets = row_buckets
        self.kv_buckets = scheduler_config.decode_kv_buckets
        self.record = record
        self.records: list[tuple[float, int, int]] = []  # (H*, terminal rank, accepted)
        self.bin_counts = [0, 0, 0, 0]
        self._last: dict[str, tuple[DraftTree, np.ndarray]] = {}

    @property
    def fused(self) -> bool:
        """Rounds run as one device program (jaxinfer.spec.round); calibration (``record``) needs every
        round's candidates on the host, so it keeps the two-call path."""
        return not self.record

    def shapes(self) -> list[DraftShape]:
        return [self._shape(rows, kv) for rows in self.row_buckets for kv in self.kv_buckets]

    def round_shape(self, rows: int, num_nodes: int, path_len: int, kv_tokens: int) -> RoundShape:
        return RoundShape(rows, num_nodes, path_len, kv_tokens, self.config.top_k, self.depth, self.base_depth)

    def round(self, seqs: list[Sequence], limits: list[int], shape: RoundShape) -> RoundResult:
        """One fused round for seqs (limits: the nodes each request's pages allow)."""
        runner = self.runner
        batch = build_round_input(seqs, limits, shape.num_rows, runner.builder.max_pages_per_seq,
                                  runner.scheduler_config.max_num_seqs)
        result = runner.run(RoundProgram(shape, self.policy.variants, self.policy.thresholds), batch)
        for row in range(len(seqs)):
            self.bin_counts[self.policy.bin(float(result.entropy[row]))] += 1
        return result

    def _shape(self, rows: int, kv_tokens: int) -> DraftShape:
        return DraftShape(rows, kv_tokens, self.config.top_k, self.depth, self.base_depth)

    def propose(self, seqs: list[Sequence], num_nodes: int) -> list[DraftTree]:
        rows = bucket(len(seqs), self.row_buckets)
        kv_tokens = bucket(max(seq.num_computed for seq in seqs), self.kv_buckets)
        batch = build_draft_input(seqs, rows, self.runner.builder.max_pages_per_seq)
        out = self.runner.run(DraftProgram(self._shape(rows, kv_tokens)), batch)
        trees = []
        for row, seq in enumerate(seqs):
            entropy = float(out["entropy"][row])
            self.bin_counts[self.policy.bin(entropy)] += 1
            depth, budget = self.policy.choose(entropy)
            tree, scores = select_tree(seq.token(seq.num_computed), out["tokens"][row], out["parents"][row],
                                       out["scores"][row], out["depths"][row], depth, min(budget, num_nodes), entropy)
            if self.record:
                self._last[seq.request_id] = (tree, scores)
            trees.append(tree)
        return trees

    def observe(self, seqs: list[Sequence], result) -> None:
        if not self.record:
            return
        for row, seq in enumerate(seqs):
            tree, scores = self._last.pop(seq.request_id)
            accepted = int(result.num_accepted[row])
            node = 0
            for token in result.tokens[row, :accepted]:  # walk the accepted tokens down the tree
                node = next(c for c in range(1, tree.num_nodes) if tree.parents[c] == node and tree.tokens[c] == token)
            rank = 0 if node == 0 else int(np.sum(scores > scores[node - 1]))
            self.records.append((tree.entropy, rank, accepted))
