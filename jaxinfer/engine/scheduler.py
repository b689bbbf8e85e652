"""Continuous batching: which tokens of which requests go into the next step (host only, no jax).

Policy per step, within the token budget:
1. Running requests in arrival order: one token per decoding request, the next chunk of a prompt
   still being prefilled. When pages run out the newest running request is preempted: its pages
   are freed and it re-queues at the front of the waiting line, to be recomputed later (its prefix
   pages may still be in the prefix cache). A request never preempts an older one.
2. If nothing was preempted, waiting requests first come, first served, while the budget, the
   running limit and the free pages allow (prefix-cache hits count as already computed).
A single request always fits (the engine checks prompt + max_tokens <= max_model_len <= pool), so
the oldest request always progresses: no deadlock, and running out of pages is never an error.

Long prompts (``long_prompt_len``, the blocked prefill backend): a chunk of a prompt longer than that
runs as a step of its own ("blocked" step: one request, no decodes), starting on a block boundary.
Blocked steps alternate with ordinary steps while both have work, so decodes stall for at most one
chunk at a time and long prompts still progress. A chunk that starts off a block boundary (after a
prefix-cache hit) runs on the ordinary path and ends on a boundary, so the next one is blocked.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from jaxinfer.config import SchedulerConfig
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.sequence import FinishReason, Sequence, SequenceStatus
from jaxinfer.sampling_params import SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429 / RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first token index of the chunk
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """The chunk reaches the last known token, so the step samples the next one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    decodes: list[Sequence]
    prefills: list[PrefillChunk]
    preempted: list[Sequence]
    blocked: bool = False  # a long prompt's chunk alone, for the blocked prefill backend
    steps: list[int] = dataclasses.field(default_factory=list)  # burst: most steps of each decode row
    # a burst planned while the previous one runs: the tokens each row gains from that one first
    ahead: list[int] = dataclasses.field(default_factory=list)

    @property
    def burst(self) -> bool:
        """The step is a burst of decode steps in one device call (``steps`` per decode row)."""
        return bool(self.steps)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(chunk.num_tokens for chunk in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, *, long_prompt_len: int = 0,
                 block_size: int = 64):
        """long_prompt_len: prompts longer than this get blocked steps (0: never); block_size: their
        chunks start on multiples of it."""
        if not config.max_model_len:
            raise ValueError("SchedulerConfig must be resolved (max_model_len set) before use")
        if long_prompt_len and config.max_num_batched_tokens < block_size:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least the "
                             f"sparse prefill block size ({block_size})")
        self.config = config
        self.block_manager = block_manager
        self.long_prompt_len = long_prompt_len
        self.block_size = block_size
        self._last_blocked = False
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue full ({self.config.max_waiting} requests); retry later")
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take seq out of the queues and free its pages and slot (finish or abort)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()

    # -- a running request moving to another replica (jaxinfer.engine.migration_port) -----------

    def detach(self, seq: Sequence) -> None:
        """Stop scheduling a running request; it keeps its pages and slot (``reattach`` or ``release``)."""
        self.running.remove(seq)

    def reattach(self, seq: Sequence) -> None:
        """Schedule a detached request again (the move failed)."""
        self.running.append(seq)

    def release(self, seq: Sequence) -> None:
        """Free a detached request's pages and slot (it runs elsewhere now)."""
        self._release(seq)

    def requeue(self, seq: Sequence) -> None:
        """An arrived request that recomputes its KV: it waits at the head of the queue, nothing computed."""
        seq.num_computed, seq.status = 0, SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def reserve_arrival(self, request_id: str, num_tokens: int) -> tuple[Sequence, int] | None:
        """A slot, and pages for ``num_tokens`` tokens held by an empty shell sequence, for a request
        arriving from another replica (None: not free). ``cancel_arrival`` returns them; ``attach``
        installs the request in them."""
        shell = Sequence(request_id, [], SamplingParams())
        if not self._free_slots or not self.block_manager.can_append(shell, num_tokens):
            return None
        self.block_manager.append(shell, num_tokens)
        return shell, self._free_slots.pop()

    def grow_arrival(self, shell: Sequence, num_pages: int) -> bool:
        """At least ``num_pages`` pages for an arrival (False: not enough are free; nothing changed)."""
        tokens = num_pages * self.block_manager.page_size  # the shell computed nothing: pages from token 0
        if not self.block_manager.can_append(shell, tokens):
            return False
        self.block_manager.append(shell, tokens)
        return True

    def cancel_arrival(self, shell: Sequence, slot: int) -> None:
        self.block_manager.free(shell)
        self._free_slots.append(slot)

    def attach(self, seq: Sequence, shell: Sequence, slot: int, num_pages: int) -> None:
        """Run an arrived request here: its KV is in the shell's first ``num_pages`` pages (the rest are
        freed); its full pages join this replica's prefix cache."""
        self.block_manager.free_tail(shell, num_pages)
        seq.pages, seq.slot, seq.status = shell.pages, slot, SequenceStatus.RUNNING
        self.running.append(seq)
        self.block_manager.commit(seq)

    # -- pages of running requests --------------------------------------------------------------

    def computed(self, seq: Sequence, count: int) -> None:
        """``count`` more of seq's tokens have their KV in its pages (a step, a burst or a verified
        round ran): its progress advances and its newly completed pages join the prefix cache. Call
        it once those tokens are in seq (a page's hash covers its tokens); a finished seq has no
        pages left to register."""
        seq.num_computed += count
        self.block_manager.commit(seq)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.block_manager.can_append(seq, num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Pages for ``num_tokens`` tokens past seq's computed ones (a speculative round's draft tree;
        ``trim`` returns those its accepted path did not fill)."""
        self.block_manager.append(seq, num_tokens)

    def trim(self, seq: Sequence) -> None:
        self.block_manager.trim(seq)

    def is_long(self, seq: Sequence) -> bool:
        """The request's prompt goes through the blocked prefill backend."""
        return bool(self.long_prompt_len) and len(seq.prompt_ids) > self.long_prompt_len and seq.params.sparse_prefill

    def _blocked_ready(self, seq: Sequence) -> bool:
        """A long prompt still prefilling whose next chunk starts on a block boundary."""
        return not seq.is_decoding and self.is_long(seq) and seq.num_computed % self.block_size == 0

    def _chunk_end(self, seq: Sequence, start: int, num_new: int) -> int:
        """Shorten a long prompt's chunk to end on a block boundary unless it finishes the prompt."""
        if self.is_long(seq) and start + num_new < seq.num_tokens:
            aligned = num_new - (start + num_new) % self.block_size
            return aligned if aligned > 0 else num_new
        return num_new

    def schedule(self, burst: bool = True) -> SchedulerOutput:
        """The next step; a decode-only step becomes a burst where it can (see plan_burst), unless
        ``burst`` is False (the caller may still call plan_burst: a speculative engine decides first
        whether the step is a round)."""
        out = self._schedule()
        if burst:
            self.plan_burst(out)
        return out

    def plan_burst(self, out: SchedulerOutput) -> None:
        """Turn a decode-only step into a burst when nothing waits that could be admitted meanwhile:
        each row may run until its length budget (max_tokens, the context limit) or decode_steps, and
        gets the pages for that now. Not enough free pages: an ordinary step."""
        if (self.config.decode_steps <= 1 or not out.decodes or out.prefills or out.preempted or out.burst
                or (self.waiting and self._free_slots)):
            return
        steps = [self._burst_steps(seq) for seq in out.decodes]
        if max(steps) > 1 and self._reserve(out.decodes, [0] * len(steps), steps):
            out.steps = steps

    def chain_burst(self, previous: SchedulerOutput) -> SchedulerOutput | None:
        """The burst that continues ``previous``, a burst still running on the device whose tokens the
        host has not seen, for the same rows in the same order; None when the host should look first:
        a waiting request could be admitted, a request runs that ``previous`` does not decode, no row
        has steps left or their pages are not free. Every row is assumed to run all its steps in
        ``previous`` (one that stops early stays stopped on the device)."""
        if self.config.decode_steps <= 1 or (self.waiting and self._free_slots):
            return None
        live = [seq.status is SequenceStatus.RUNNING for seq in previous.decodes]
        if sum(live) != len(self.running):
            return None
        ahead = [n if alive else 0 for n, alive in zip(previous.steps, live, strict=True)]
        steps = [self._burst_steps(seq, a) if alive else 0
                 for seq, a, alive in zip(previous.decodes, ahead, live, strict=True)]
        if not any(steps) or not self._reserve(previous.decodes, ahead, steps):
            return None
        return SchedulerOutput(list(previous.decodes), [], [], steps=steps, ahead=ahead)

    def _burst_steps(self, seq: Sequence, ahead: int = 0) -> int:
        """Steps a decoding row may run in a burst once ``ahead`` more tokens are in: up to decode_steps,
        within max_tokens and the context limit."""
        config = self.config
        return max(0, min(config.decode_steps, seq.params.max_tokens - len(seq.output_ids) - ahead,
                          config.max_model_len - seq.num_tokens - ahead))

    def _reserve(self, seqs: list[Sequence], ahead: list[int], steps: list[int]) -> bool:
        """Give each row with steps the pages for its ``ahead + steps`` next tokens, if all are free."""
        blocks = self.block_manager
        rows = [(seq, a, n) for seq, a, n in zip(seqs, ahead, steps, strict=True) if n]
        if sum(blocks.pages_needed(seq.num_computed + a + n) - len(seq.pages) for seq, a, n in rows) > blocks.num_free:
            return False
        for seq, a, n in rows:
            blocks.append(seq, a + n)
        return True

    def _schedule(self) -> SchedulerOutput:
        if not self.long_prompt_len:
            return self._schedule_mixed()
        order = (self._schedule_mixed, self._schedule_blocked) if self._last_blocked else (
            self._schedule_blocked, self._schedule_mixed)
        out = None
        for schedule in order:
            out = schedule()
            if out is not None and (not out.empty or out.preempted):
                break
        out = out or SchedulerOutput([], [], [])
        self._last_blocked = out.blocked
        return out

    def _schedule_blocked(self) -> SchedulerOutput | None:
        """The next chunk of the oldest long prompt that can take one, alone in the step; None if none."""
        blocks, budget = self.block_manager, self.config.max_num_batched_tokens
        out = SchedulerOutput([], [], [], blocked=True)
        seq = next((s for s in self.running if self._blocked_ready(s)), None)
        if seq is None:
            if not self.waiting or not self._free_slots or not self.is_long(self.waiting[0]):
                return None
            seq = self.waiting[0]
            hits = blocks.match_prefix(seq)
            start = len(hits) * blocks.page_size
            if start % self.block_size:
                return None  # the ordinary path runs the first chunk up to a block boundary
            num_new = self._chunk_end(seq, start, min(seq.num_tokens - start, budget))
            if not blocks.can_admit(seq, hits, num_new):
                return None
            self.waiting.popleft()
            self._admit(seq, hits)
        else:
            num_new = self._chunk_end(seq, seq.num_computed, min(seq.num_uncomputed, budget))
            while not blocks.can_append(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return out
        blocks.append(seq, num_new)
        out.prefills.append(PrefillChunk(seq, seq.num_computed, num_new))
        return out

    def _admit(self, seq: Sequence, hits) -> None:
        self.block_manager.admit(seq, hits)
        seq.resumed_at = seq.num_computed
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.perf_counter()
            seq.num_cached = seq.num_computed
        seq.status = SequenceStatus.RUNNING
        seq.slot = self._free_slots.pop()
        self.running.append(seq)

    def _schedule_mixed(self) -> SchedulerOutput:
        """Decodes and prompt chunks together (long prompts ready for a blocked step wait for one)."""
        config, blocks = self.config, self.block_manager
        budget = config.max_num_batched_tokens
        out = SchedulerOutput([], [], [])
        prefill_kv = 0  # sum of the prefill requests' KV lengths: bounded by the largest KV bucket

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.is_decoding:
                num_new = 1
            else:
                if self._blocked_ready(seq):
                    index += 1
                    continue
                num_new = self._chunk_end(seq, seq.num_computed, min(seq.num_uncomputed, budget))
                if (num_new < seq.num_uncomputed and not config.enable_chunked_prefill) \
                        or len(out.prefills) == config.max_prefill_seqs \
                        or prefill_kv + seq.num_computed + num_new > config.max_model_len:
                    index += 1
                    continue
            while not blocks.can_append(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            blocks.append(seq, num_new)
            if seq.is_decoding:
                out.decodes.append(seq)
            else:
                out.prefills.append(PrefillChunk(seq, seq.num_computed, num_new))
                prefill_kv += seq.num_computed + num_new
            budget -= num_new
            index += 1

        while self.waiting and not out.preempted and budget > 0 and self._free_slots \
                and len(out.prefills) < config.max_prefill_seqs:
            seq = self.waiting[0]
            hits = blocks.match_prefix(seq)
            start = len(hits) * blocks.page_size
            if self.is_long(seq) and start % self.block_size == 0:
                break  # admitted by a blocked step
            num_new = self._chunk_end(seq, start, min(seq.num_tokens - start, budget))
            if num_new < seq.num_tokens - start and not config.enable_chunked_prefill:
                break
            if prefill_kv + len(hits) * blocks.page_size + num_new > config.max_model_len \
                    or not blocks.can_admit(seq, hits, num_new):
                break
            self.waiting.popleft()
            self._admit(seq, hits)
            blocks.append(seq, num_new)
            out.prefills.append(PrefillChunk(seq, seq.num_computed, num_new))
            prefill_kv += seq.num_computed + num_new
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self._free_slots.append(seq.slot)
        seq.slot = -1
