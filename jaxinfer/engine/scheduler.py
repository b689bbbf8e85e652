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
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from jaxinfer.config import SchedulerConfig
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.sequence import FinishReason, Sequence, SequenceStatus


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

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(chunk.num_tokens for chunk in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if not config.max_model_len:
            raise ValueError("SchedulerConfig must be resolved (max_model_len set) before use")
        self.config = config
        self.block_manager = block_manager
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

    def schedule(self) -> SchedulerOutput:
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
                num_new = min(seq.num_uncomputed, budget)
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

        while self.waiting and not out.preempted and budget > 0 and len(self.running) < config.max_num_seqs \
                and len(out.prefills) < config.max_prefill_seqs:
            seq = self.waiting[0]
            hits = blocks.match_prefix(seq)
            num_new = min(seq.num_tokens - len(hits) * blocks.page_size, budget)
            if num_new < seq.num_tokens - len(hits) * blocks.page_size and not config.enable_chunked_prefill:
                break
            if prefill_kv + len(hits) * blocks.page_size + num_new > config.max_model_len \
                    or not blocks.can_admit(seq, hits, num_new):
                break
            self.waiting.popleft()
            blocks.admit(seq, hits)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.perf_counter()
                seq.num_cached = seq.num_computed
            blocks.append(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            seq.slot = self._free_slots.pop()
            self.running.append(seq)
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
