"""One speculative round for the decoding requests of a step: draft, verify, commit (host side).

The engine hands over a step that only decodes (no prompt chunks) for at most ``max_batch``
requests that can speculate (no repetition/presence/frequency penalties, whose token history
would differ along tree paths). Other steps, and larger batches, where verifying trees costs more
than it saves, decode plainly: the automatic fallback. Within max_batch the decoder also compares
the measured tokens/s of rounds and of plain decode steps per batch size and decodes plainly where
rounds do not pay.

Each request's tree needs KV slots committed .. committed + nodes - 1 for the round; when the pool
cannot give them, its tree shrinks to the root (a plain decode inside the round). After
verification the request keeps the pages its committed tokens need; the rest go back.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import jax

from jaxinfer.buckets import bucket, geometric
from jaxinfer.config import SpeculativeConfig
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.sequence import Sequence
from jaxinfer.spec.batch import TreeShape, build_tree_input
from jaxinfer.spec.ngram import NgramDrafter
from jaxinfer.spec.programs import DraftProgram, RoundProgram, VerifyProgram
from jaxinfer.spec.tree import DraftTree, pack

logger = logging.getLogger(__name__)
PROBE_EVERY = 64  # decisions between re-measurements of both sides while rounds win
PROBE_EVERY_MAX = 1024  # the interval doubles each time plain steps win, up to this
PROBE_STEPS = 3  # steps of each side per measurement
PROBE_GIVE_UP = 0.5  # a probe ends after one round slower than this share of plain steps' speed


@dataclasses.dataclass
class SpecStats:
    rounds: int = 0  # verification steps (target calls)
    requests: int = 0  # request-rounds (a round verifies up to max_batch requests)
    verified_tokens: int = 0  # tree nodes run through the target, roots included
    accepted_tokens: int = 0  # draft tokens accepted
    emitted_tokens: int = 0  # accepted + one bonus token per request-round
    fallback_steps: int = 0  # decode-only steps that could not speculate (batch too large, penalties)

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per request-round (accepted drafts + the bonus token)."""
        return self.emitted_tokens / self.requests if self.requests else 0.0


@dataclasses.dataclass
class _Probe:
    """A batch bucket's probe cycle: decisions into it, its length, and the rounds of its probe."""
    decisions: int = 0
    length: int = PROBE_EVERY
    tokens: int = 0
    seconds: float = 0.0
    probing: bool = False  # the last decision was a probe round

    def observe(self, tokens: int, seconds: float) -> None:
        if self.probing:
            self.tokens += tokens
            self.seconds += seconds

    def given_up(self, floor: float) -> bool:
        """The probe's rounds so far ran below ``floor`` tokens/s: the rest of it is skipped."""
        return bool(self.seconds) and self.tokens / self.seconds < floor

    def count(self, spec_won: bool) -> None:
        """One more decision; at the end of the cycle the next starts, sooner while rounds win, later
        while they lose."""
        self.decisions += 1
        if self.decisions >= self.length:
            length = PROBE_EVERY if spec_won else min(2 * self.length, PROBE_EVERY_MAX)
            self.decisions, self.length, self.tokens, self.seconds = 0, length, 0, 0.0


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, scheduler: Scheduler, runner, drafter=None):
        scheduler_config = scheduler.config
        self.config = config
        self.max_model_len = scheduler_config.max_model_len
        self.runner = runner
        self.scheduler = scheduler  # the owner of the requests' pages and progress
        self.row_buckets = geometric(1, 2, config.max_batch)
        self.kv_buckets = scheduler_config.decode_kv_buckets  # like decode steps: attention over padded slots costs
        # verify shapes: every variant's budget, and for n-gram trees smaller ones
        # (rounds whose trees are all bare roots run as plain decode steps instead; draft-head trees are full)
        largest = max(nodes for _, nodes in config.variants())
        smaller = set() if config.uses_draft_head else {largest // 2, largest // 4} - {0, 1}
        self.budgets = tuple(sorted({nodes for _, nodes in config.variants()} | smaller))
        self.path_len = config.verified_depth() + 1
        self.drafter = drafter or NgramDrafter(config.ngram_max, config.depth, max_paths=config.top_k)
        self.stats = SpecStats()
        # (spec|plain, rows bucket) -> the latest (tokens, seconds) samples
        self._samples: dict[tuple[str, int], collections.deque] = {}
        self._probe: dict[int, _Probe] = {}  # rows bucket -> its probe cycle

    @property
    def fused(self) -> bool:
        return getattr(self.drafter, "fused", False)

    def programs(self) -> list:
        """Every device program a round can run (verify and draft steps, or fused rounds), one per
        shape: the runner's compile plan lists them and warm-up compiles them."""
        if self.fused:
            policy = self.drafter.policy
            return [RoundProgram(self.drafter.round_shape(rows, nodes, self.path_len, kv), policy.variants,
                                 policy.thresholds)
                    for rows in self.row_buckets for nodes in self.budgets for kv in self.kv_buckets]
        verify = [VerifyProgram(TreeShape(rows, nodes, self.path_len, kv)) for rows in self.row_buckets
                  for nodes in self.budgets for kv in self.kv_buckets]
        return verify + [DraftProgram(shape) for shape in getattr(self.drafter, "shapes", list)()]

    def eligible(self, decodes: list[Sequence], has_prefills: bool, count: bool = True) -> bool:
        """Whether this step should be a round: it only decodes, few enough requests without
        penalties, and rounds have measured at least as fast as plain steps at this batch size. Each
        side is measured over PROBE_STEPS steps before the first decision and again at the start of
        every probe cycle of a batch bucket: PROBE_EVERY decisions while rounds win, twice as many after
        each cycle plain steps won (up to PROBE_EVERY_MAX), since a probe round where rounds lose costs
        what it measures; for the same reason a probe ends after its first round when that ran below
        PROBE_GIVE_UP of plain steps' speed. A plain step may be a burst of steps (one decision).
        count=False: only ask, the decision is not counted (a burst chain asks before it goes on)."""
        if has_prefills or not decodes:
            return False
        ok = len(decodes) <= self.config.max_batch and not any(seq.params.uses_penalties for seq in decodes)
        if ok and self.config.adaptive:
            rows = bucket(len(decodes), self.row_buckets)
            probe = self._probe.setdefault(rows, _Probe())
            plain, probing = self.rate("plain", rows), False
            if len(self._samples.get(("plain", rows), ())) < PROBE_STEPS or probe.decisions < PROBE_STEPS:
                ok = False  # measure plain steps first, and again at the start of every cycle
            elif ((len(self._samples.get(("spec", rows), ())) < PROBE_STEPS or probe.decisions < 2 * PROBE_STEPS)
                  and not probe.given_up(plain * PROBE_GIVE_UP)):
                ok = probing = True  # then rounds
            else:
                ok = self.rate("spec", rows) >= plain
            if count:
                probe.probing = probing
                probe.count(ok)
        if not ok and count:
            self.stats.fallback_steps += 1
        return ok

    def observe_step(self, kind: str, num_decodes: int, tokens: int, seconds: float) -> None:
        """A decode-only step's speed (kind 'spec': a round, or the plain step a round without drafts
        became; 'plain': a plain step or burst), kept per batch bucket."""
        if not 0 < num_decodes <= self.config.max_batch or seconds <= 0:
            return
        rows = bucket(num_decodes, self.row_buckets)
        self._samples.setdefault((kind, rows), collections.deque(maxlen=2 * PROBE_STEPS - 1)).append((tokens, seconds))
        if kind == "spec" and rows in self._probe:
            self._probe[rows].observe(tokens, seconds)

    def rate(self, kind: str, rows: int) -> float | None:
        """Tokens/s of ``kind`` steps at this batch bucket over the latest samples, without the longest
        one when there are three or more (a page fault, another process: one slow step must not keep the
        engine on the slower side). Tokens over seconds, not a mean of rates: a round's tokens vary.
        None: no samples yet."""
        samples = sorted(self._samples.get((kind, rows), ()), key=lambda sample: sample[1])
        if len(samples) >= 3:
            samples = samples[:-1]
        return sum(t for t, _ in samples) / sum(s for _, s in samples) if samples else None

    def _node_limit(self, seq: Sequence, nodes: int) -> int:
        """How many of ``nodes`` tree nodes seq's context and the free pages allow (at worst the root alone)."""
        limit = min(nodes, self.max_model_len - seq.num_computed)
        while limit > 1 and not self.scheduler.can_grow(seq, limit):
            limit = 1 if limit <= 2 else limit // 2
        return limit

    def _reserve(self, seq: Sequence, cap: int) -> int:
        """Pages for up to cap nodes of seq's tree; returns how many nodes they hold."""
        limit = self._node_limit(seq, cap)
        self.scheduler.grow(seq, limit)
        return limit

    def _fit(self, seq: Sequence, tree: DraftTree, cap: int) -> DraftTree:
        """Cut the tree to cap nodes, to what the free pages allow (at worst the root alone) and to
        the deepest path a verify step commits."""
        limit = self._node_limit(seq, min(tree.num_nodes, cap))
        tree = tree.prune(self.path_len - 1, limit)
        self.scheduler.grow(seq, tree.num_nodes)
        return tree

    def step(self, seqs: list[Sequence]) -> list[tuple[list[int], list | None]] | None:
        """Verify one drafted tree per request. Returns per request the emitted tokens (accepted drafts
        and the bonus token) and, if it asked for them, their logprobs as (logprob, {id: logprob});
        None when nothing was drafted (or no budget fits the context): the caller decodes plainly.
        The caller appends the tokens to the outputs, then counts them as computed
        (``Scheduler.computed``: the committed path's KV is in place) and calls ``release``."""
        with jax.profiler.TraceAnnotation("spec_round", rows=len(seqs)):
            return self._round(seqs)

    def _round(self, seqs: list[Sequence]) -> list[tuple[list[int], list | None]] | None:
        # near the context limit the batch takes a smaller budget: committed + nodes must fit a KV bucket
        longest = max(s.num_computed for s in seqs)
        fitting = [b for b in self.budgets if longest + b <= self.kv_buckets[-1]]
        if not fitting:
            return None
        cap = max(fitting)
        if self.fused:
            return self._fused_round(seqs, cap, longest)
        proposed = self.drafter.propose(seqs, cap)
        trees = [self._fit(seq, tree, cap) for seq, tree in zip(seqs, proposed, strict=True)]
        if max(tree.num_nodes for tree in trees) == 1:
            return None  # nothing drafted: a plain decode step does the same for less
        num_nodes = bucket(max(tree.num_nodes for tree in trees), self.budgets)
        rows = bucket(len(seqs), self.row_buckets)
        kv_tokens = bucket(longest + num_nodes, self.kv_buckets)
        shape = TreeShape(rows, num_nodes, self.path_len, kv_tokens)
        runner = self.runner
        batch = build_tree_input(seqs, pack(trees, rows, num_nodes), shape, runner.builder.page_size,
                                 runner.builder.max_pages_per_seq, runner.scheduler_config.max_num_seqs,
                                 impl=runner.impl, interpret=runner.interpret)
        result = runner.run(VerifyProgram(shape), batch)
        self.drafter.observe(seqs, result)
        return self._emit(seqs, result, [tree.num_nodes for tree in trees])

    def _fused_round(self, seqs: list[Sequence], cap: int, longest: int) -> list[tuple[list[int], list | None]]:
        """Draft, choose the subtrees, verify and commit in one device call (jaxinfer.spec.round)."""
        limits = [self._reserve(seq, cap) for seq in seqs]
        rows = bucket(len(seqs), self.row_buckets)
        kv_tokens = bucket(longest + cap, self.kv_buckets)
        out = self.drafter.round(seqs, limits, self.drafter.round_shape(rows, cap, self.path_len, kv_tokens))
        return self._emit(seqs, out.verify, [int(size) for size in out.sizes[:len(seqs)]])

    def _emit(self, seqs: list[Sequence], result, sizes: list[int]) -> list[tuple[list[int], list | None]]:
        """Per request the emitted tokens (and logprobs) of a verified round; counts the round."""
        emitted = []
        for row, (seq, size) in enumerate(zip(seqs, sizes, strict=True)):
            accepted = int(result.num_accepted[row])
            tokens = result.tokens[row, :accepted + 1].tolist()
            logprobs = None
            if seq.params.logprobs is not None and result.token_logprobs is not None:
                count = seq.params.logprobs
                logprobs = [(float(result.token_logprobs[row, j]),
                             dict(zip(result.top_ids[row, j, :count].tolist(),
                                      result.top_logprobs[row, j, :count].tolist(), strict=True)))
                            for j in range(accepted + 1)]
            emitted.append((tokens, logprobs))
            self.stats.verified_tokens += size
            self.stats.accepted_tokens += accepted
            self.stats.emitted_tokens += accepted + 1
        self.stats.rounds += 1
        self.stats.requests += len(seqs)
        return emitted

    def release(self, seq: Sequence) -> None:
        """After the round's tokens are appended: return the pages past the committed tokens (the
        completed ones joined the prefix cache when the round was counted)."""
        self.scheduler.trim(seq)
