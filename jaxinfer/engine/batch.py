"""A scheduled step as one pytree of padded arrays, built with numpy and moved in one device_put.

Token layout: ``Bd`` decode rows (one token per decoding request), then ``Tp`` prompt-chunk tokens.
Sampling rows: the Bd decode rows, then one row per prompt chunk (its last token), ``Bp`` rows.
Every dimension is padded to a bucket (``StepShape``) so the runner has one compiled step per shape.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinfer.buckets import bucket
from jaxinfer.config import SchedulerConfig, SparsePrefillConfig
from jaxinfer.engine.scheduler import SchedulerOutput
from jaxinfer.layers.attention import BlockedMeta, RaggedMeta
from jaxinfer.layers.kv_pages import PAD_SLOT
from jaxinfer.layers.sampler import SamplingArrays, key_data_from_seed

# Stop token ids a burst checks on the device per row (end-of-sequence ids first, then the request's
# stop_token_ids). The host checks every stop condition again, so a longer list only costs steps.
STOP_WIDTH = 8


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    num_decode: int  # Bd decode rows (0: no decode part)
    decode_kv_tokens: int  # KV slots each decode row reads (a KV bucket; 0 without decodes)
    num_prefill_tokens: int  # Tp prompt tokens (0: no prompt part)
    prefill_kv_tokens: int  # bound on the prompt requests' summed KV lengths (0 without prompts)
    blocked: bool = False  # one long prompt's chunk through the blocked prefill backend


def blocked_buckets(config: SchedulerConfig, block_size: int) -> tuple[int, tuple[int, ...]]:
    """Chunk length and KV buckets of blocked steps: every chunk is padded to the largest prompt
    bucket (one compiled shape per KV bucket), all rounded up to whole blocks."""
    def rounded(value):
        return -(-value // block_size) * block_size
    chunk = rounded(config.prefill_buckets[-1])
    return chunk, tuple(sorted({rounded(b) for b in config.kv_buckets if rounded(b) >= chunk})) or (chunk,)


def step_shape(out: SchedulerOutput, config: SchedulerConfig, block_size: int = 64) -> StepShape:
    """Bucketed shape of a scheduled step. Mixed steps pad the prompt part to the largest prompt
    bucket and its KV bound to a mixed KV bucket, so mixing adds few compiled variants."""
    if out.blocked:
        chunk = out.prefills[0]
        tokens, kv_buckets = blocked_buckets(config, block_size)
        return StepShape(0, 0, tokens, bucket(chunk.start + chunk.num_tokens, kv_buckets), blocked=True)
    num_decode = decode_kv = prefill_tokens = prefill_kv = 0
    if out.decodes:
        num_decode = bucket(len(out.decodes), config.decode_buckets)
        steps, ahead = out.steps or [1] * len(out.decodes), out.ahead or [0] * len(out.decodes)
        decode_kv = bucket(max((seq.num_computed + a + n for seq, a, n in zip(out.decodes, ahead, steps, strict=True)
                                 if n), default=1), config.kv_buckets if out.prefills else config.decode_kv_buckets)
    if out.prefills:
        tokens = sum(chunk.num_tokens for chunk in out.prefills)
        prefill_tokens = config.prefill_buckets[-1] if out.decodes else bucket(tokens, config.prefill_buckets)
        prefill_kv = bucket(sum(c.start + c.num_tokens for c in out.prefills),
                             config.mixed_kv_buckets if out.decodes else config.kv_buckets)
    return StepShape(num_decode, decode_kv, prefill_tokens, prefill_kv)


def all_step_shapes(config: SchedulerConfig, sparse: SparsePrefillConfig | None = None) -> list[StepShape]:
    """Every shape step_shape can return: what warm-up compiles."""
    shapes = [StepShape(d, kv, 0, 0) for d in config.decode_buckets for kv in config.decode_kv_buckets]
    shapes += [StepShape(0, 0, t, kv) for t in config.prefill_buckets for kv in config.kv_buckets]
    shapes += [StepShape(d, dkv, config.prefill_buckets[-1], pkv) for d in config.decode_buckets
               for dkv in config.kv_buckets for pkv in config.mixed_kv_buckets]
    if sparse is not None and sparse.enabled and config.max_model_len > sparse.min_len:
        tokens, kv_buckets = blocked_buckets(config, sparse.unisparse.block_size)
        shapes += [StepShape(0, 0, tokens, kv, blocked=True) for kv in kv_buckets]
    return shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleInput:
    """The sampling half of a step: one row per request that may sample, N = Bd + Bp."""

    sampling: SamplingArrays  # [N] rows
    row_slots: jax.Array  # [N] int32 penalty-state slot of each row (padding: out of range)
    emit: jax.Array  # [N] bool: the row's sampled token is kept (decodes, completed prompts)
    want_logprobs: jax.Array  # [] bool: some row asked for logprobs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BurstInput:
    """What a burst of decode steps needs beyond its first step's StepInput, per decode row."""

    budget: jax.Array  # [Bd] int32 most steps the row runs (padding rows: 0)
    stop_ids: jax.Array  # [Bd, STOP_WIDTH] int32 tokens that end the row on the device (-1: none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CatchUp:
    """Per token of a step: where its shifted draft pair comes from and goes."""

    from_pending: jax.Array  # [T] bool: the previous feature is the slot's pending one
    slots: jax.Array  # [T] int32 request slot (padding: out of range)
    positions: jax.Array  # [T] int32 position p-1 of the pair (clamped at 0)
    slot_mapping: jax.Array  # [T] int32 KV slot of position p-1 (no pair: out of range, dropped)
    is_last: jax.Array  # [T] bool: last token of its request in the step (its feature becomes pending)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    tokens: jax.Array  # [T] int32, T = Bd + Tp
    positions: jax.Array  # [T] int32
    meta: RaggedMeta | BlockedMeta
    logits_indices: jax.Array  # [N] int32 rows of T that are sampled
    reset_slots: jax.Array  # [Bp] int32 slots whose penalty state restarts (first chunk of a request)
    token_slots: jax.Array  # [Tp] int32 slot of each prompt-part token (padding: out of range)
    token_is_output: jax.Array  # [Tp] bool: a recomputed generated token (counts for penalties)
    sample: SampleInput
    catch_up: CatchUp | None = None  # with a draft head: the shifted draft pairs of the step's tokens


class BatchBuilder:
    """Turns SchedulerOutputs into StepInputs for one cache geometry."""

    def __init__(self, config: SchedulerConfig, page_size: int, num_pages: int,
                 sparse: SparsePrefillConfig | None = None, catch_up: bool = False):
        self.config = config
        self.catch_up = catch_up
        self.page_size = page_size
        self.num_pages = num_pages
        self.sparse = sparse if sparse is not None and sparse.enabled else None
        kv_limit = config.max_model_len
        if self.sparse is not None:
            kv_limit = max(kv_limit, blocked_buckets(config, self.sparse.unisparse.block_size)[1][-1])
        self.max_pages_per_seq = -(-kv_limit // page_size)

    def num_rows(self, shape: StepShape) -> int:
        """Sampling rows N of a step: its decode rows plus, with a prompt part, one per possible chunk."""
        return shape.num_decode + (self.config.max_prefill_seqs if shape.num_prefill_tokens else 0)

    def build(self, out: SchedulerOutput, shape: StepShape, *, impl: str, interpret: bool) -> StepInput:
        cfg, page_size = self.config, self.page_size
        num_decode = shape.num_decode
        num_prefill = cfg.max_prefill_seqs if shape.num_prefill_tokens else 0
        num_tokens, num_rows = num_decode + shape.num_prefill_tokens, self.num_rows(shape)
        pad_slot, pad_state = PAD_SLOT, cfg.max_num_seqs
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slot_mapping = np.full(num_tokens, pad_slot, np.int32)
        logits_indices = np.zeros(num_rows, np.int32)
        row_slots = np.full(num_rows, pad_state, np.int32)
        emit = np.zeros(num_rows, bool)
        rows: list = [None] * num_rows

        decode_pages = -(-shape.decode_kv_tokens // page_size) if num_decode else 1
        decode_kv_lens = np.zeros(num_decode, np.int32)
        decode_page_indices = np.zeros((num_decode, decode_pages), np.int32)
        for row, seq in enumerate(out.decodes):
            if out.ahead:  # after a running burst: its last token is still on the device
                if not out.steps[row]:
                    continue  # the row is done: a padding row
                position = seq.num_computed + out.ahead[row]
            else:
                position = seq.num_computed
                tokens[row] = seq.token(position)
            positions[row] = position
            slot_mapping[row] = seq.pages[position // page_size] * page_size + position % page_size
            decode_kv_lens[row] = position + 1
            # pages the row reads; it may hold more (reserved for a burst that ended early)
            readable = seq.pages[:decode_pages]
            decode_page_indices[row, :len(readable)] = readable
            logits_indices[row], row_slots[row], emit[row], rows[row] = row, seq.slot, True, seq

        prefill_kv_lens = np.zeros(num_prefill, np.int32)
        prefill_page_indices = np.zeros((num_prefill, self.max_pages_per_seq), np.int32)
        cu_q_lens = np.zeros(num_prefill + 1, np.int32)
        reset_slots = np.full(num_prefill, pad_state, np.int32)
        token_slots = np.full(shape.num_prefill_tokens, pad_state, np.int32)
        token_is_output = np.zeros(shape.num_prefill_tokens, bool)
        offset = num_decode
        for index, chunk in enumerate(out.prefills):
            seq, start, count = chunk.seq, chunk.start, chunk.num_tokens
            span = slice(offset, offset + count)
            tokens[span] = seq.tokens(start, start + count)
            pos = np.arange(start, start + count, dtype=np.int32)
            positions[span] = pos
            pages = np.asarray(seq.pages, np.int32)
            slot_mapping[span] = pages[pos // page_size] * page_size + pos % page_size
            prefill_kv_lens[index] = start + count
            prefill_page_indices[index, :len(seq.pages)] = pages
            cu_q_lens[index + 1] = cu_q_lens[index] + count
            token_slots[span.start - num_decode:span.stop - num_decode] = seq.slot
            token_is_output[span.start - num_decode:span.stop - num_decode] = pos >= len(seq.prompt_ids)
            if start == 0:
                reset_slots[index] = seq.slot
            row = num_decode + index
            logits_indices[row], row_slots[row], rows[row] = offset + count - 1, seq.slot, seq
            emit[row] = chunk.completes_prompt
            offset += count
        cu_q_lens[len(out.prefills) + 1:] = cu_q_lens[len(out.prefills)]

        if shape.blocked:
            meta = BlockedMeta(slot_mapping=slot_mapping, kv_len=prefill_kv_lens[0], q_len=cu_q_lens[1],
                               page_indices=prefill_page_indices[0], kv_tokens=shape.prefill_kv_tokens,
                               mode=self.sparse.mode, unisparse=self.sparse.unisparse, impl=impl, interpret=interpret)
        else:
            meta = RaggedMeta(
                slot_mapping=slot_mapping, decode_kv_lens=decode_kv_lens, decode_page_indices=decode_page_indices,
                decode_num_seqs=np.array([len(out.decodes)], np.int32), prefill_kv_lens=prefill_kv_lens,
                prefill_page_indices=prefill_page_indices, prefill_cu_q_lens=cu_q_lens,
                prefill_num_seqs=np.array([len(out.prefills)], np.int32), prefill_kv_tokens=shape.prefill_kv_tokens,
                impl=impl, interpret=interpret)
        pairs = self._catch_up(out, num_decode, num_tokens, positions) if self.catch_up else None
        want_logprobs = np.array(any(s is not None and s.params.logprobs is not None for s in rows))
        sampling = sampling_arrays(rows)
        if out.ahead:
            sampling.index[:len(out.ahead)] += np.asarray(out.ahead, np.int32)
        sample = SampleInput(sampling=sampling, row_slots=row_slots, emit=emit,
                             want_logprobs=want_logprobs)
        step = StepInput(tokens=tokens, positions=positions, meta=meta, logits_indices=logits_indices,
                         reset_slots=reset_slots, token_slots=token_slots, token_is_output=token_is_output,
                         sample=sample, catch_up=pairs)
        return jax.device_put(step)

    def build_burst(self, out: SchedulerOutput, shape: StepShape, eos_ids: frozenset[int]) -> BurstInput:
        budget = np.zeros(shape.num_decode, np.int32)
        stop_ids = np.full((shape.num_decode, STOP_WIDTH), -1, np.int32)
        for row, (seq, steps) in enumerate(zip(out.decodes, out.steps, strict=True)):
            budget[row] = steps
            ids = [*(() if seq.params.ignore_eos else sorted(eos_ids)), *seq.params.stop_token_ids][:STOP_WIDTH]
            stop_ids[row, :len(ids)] = ids
        return jax.device_put(BurstInput(budget=budget, stop_ids=stop_ids))

    def _catch_up(self, out: SchedulerOutput, num_decode: int, num_tokens: int, positions: np.ndarray) -> CatchUp:
        """Token i at position p pairs with the feature of p-1: the previous token of its chunk, or for
        a request's first token in the step the slot's pending feature. A chunk right after admission
        (start == resumed_at, e.g. after a prefix-cache hit) has no pending feature: no pair."""
        page_size, pad_state = self.page_size, self.config.max_num_seqs
        from_pending = np.zeros(num_tokens, bool)
        slots = np.full(num_tokens, pad_state, np.int32)
        slot_mapping = np.full(num_tokens, PAD_SLOT, np.int32)
        is_last = np.zeros(num_tokens, bool)
        offset = num_decode
        # decode rows at their position (after a running burst: ahead of num_computed); rows done in it: none
        spans = [(row, 1, seq, int(positions[row])) for row, seq in enumerate(out.decodes)
                 if not out.ahead or out.steps[row]]
        for chunk in out.prefills:
            spans.append((offset, chunk.num_tokens, chunk.seq, chunk.start))
            offset += chunk.num_tokens
        for first, count, seq, start in spans:
            span = slice(first, first + count)
            previous = positions[span] - 1
            pages = np.asarray(seq.pages, np.int32)
            valid = previous >= 0
            if start == seq.resumed_at:
                valid[0] = False
            slot_mapping[span] = np.where(valid, pages[np.maximum(previous, 0) // page_size] * page_size
                                          + np.maximum(previous, 0) % page_size, PAD_SLOT)
            from_pending[first] = True
            slots[span] = seq.slot
            is_last[first + count - 1] = True
        return CatchUp(from_pending=from_pending, slots=slots, positions=np.maximum(positions - 1, 0),
                       slot_mapping=slot_mapping, is_last=is_last)


def sampling_arrays(rows: list) -> SamplingArrays:
    """Per-row sampling parameters of the sequences in rows (None: a padding row); index = the
    output position of the token the row samples."""
    n = len(rows)
    temperature, top_p, min_p = np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
    top_k, index = np.zeros(n, np.int32), np.zeros(n, np.int32)
    repetition, presence, frequency = np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    key_data = np.zeros((n, 2), np.uint32)
    for row, seq in enumerate(rows):
        if seq is None:
            continue
        p = seq.params
        temperature[row], top_p[row], top_k[row], min_p[row] = p.temperature, p.top_p, p.top_k, p.min_p
        repetition[row], presence[row], frequency[row] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        key_data[row] = key_data_from_seed(p.seed)
        index[row] = len(seq.output_ids)
    return SamplingArrays(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
                          key_data=key_data, index=index)
