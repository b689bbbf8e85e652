"""Scheduler policy on the host: budgets, limits, FCFS, preemption, queue bound (no device)."""

import numpy as np
import pytest

from jaxinfer.config import SchedulerConfig
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.scheduler import QueueFullError, Scheduler
from jaxinfer.engine.sequence import FinishReason, Sequence, SequenceStatus
from jaxinfer.sampling_params import SamplingParams


def _scheduler(num_pages=64, page_size=4, **overrides):
    config = SchedulerConfig(**{**dict(max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=2), **overrides})
    return Scheduler(config.resolve(256), BlockManager(num_pages, page_size))


def _complete(scheduler, out, token=1):
    """What the engine does after a step: advance computed counts and append sampled tokens."""
    for seq in out.decodes:
        seq.num_computed += 1
        seq.output_ids.append(token)
    for chunk in out.prefills:
        chunk.seq.num_computed += chunk.num_tokens
        if chunk.completes_prompt:
            chunk.seq.output_ids.append(token)


def test_token_budget_and_prefill_limits_hold():
    scheduler = _scheduler()
    for i in range(5):
        scheduler.add(Sequence(str(i), list(range(3, 13)), SamplingParams()))
    out = scheduler.schedule()
    assert out.num_tokens <= 16 and len(out.prefills) <= 2
    assert [c.seq.request_id for c in out.prefills] == ["0", "1"]  # FCFS
    assert [c.num_tokens for c in out.prefills] == [10, 6]  # the second prompt is chunked
    _complete(scheduler, out)
    out = scheduler.schedule()
    assert [s.request_id for s in out.decodes] == ["0"]
    assert out.prefills[0].seq.request_id == "1" and out.prefills[0].start == 6
    assert out.num_tokens <= 16


def test_max_num_seqs_bounds_running():
    scheduler = _scheduler(max_num_batched_tokens=64, max_prefill_seqs=8)
    for i in range(6):
        scheduler.add(Sequence(str(i), [5, 6], SamplingParams()))
    out = scheduler.schedule()
    assert len(out.prefills) == 4 and len(scheduler.running) == 4 and len(scheduler.waiting) == 2


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    scheduler = _scheduler(max_num_batched_tokens=256, enable_chunked_prefill=False)
    scheduler.add(Sequence("a", list(range(200)), SamplingParams()))
    scheduler.add(Sequence("b", list(range(100)), SamplingParams()))
    out = scheduler.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in out.prefills] == [("a", 200)]


def test_out_of_pages_preempts_the_newest_and_requeues_it_first():
    scheduler = _scheduler(num_pages=4, page_size=2, max_num_batched_tokens=64)
    a = Sequence("a", [1, 2, 3, 4], SamplingParams())
    b = Sequence("b", [4, 5, 6, 7], SamplingParams())
    scheduler.add(a)
    scheduler.add(b)
    _complete(scheduler, scheduler.schedule())  # both prefilled: 2 pages each, pool full
    assert scheduler.block_manager.num_free == 0
    out = scheduler.schedule()  # a needs a third page for token 4: b is preempted
    assert out.preempted == [b] and [s.request_id for s in out.decodes] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_computed == 0 and b.pages == []
    assert scheduler.waiting[0] is b and b.output_ids == [1]  # keeps its output for recompute
    scheduler.finish(a, FinishReason.LENGTH)
    out = scheduler.schedule()
    assert out.prefills[0].seq is b and out.prefills[0].num_tokens == 5  # prompt + generated token
    assert out.prefills[0].completes_prompt


def test_queue_bound_refuses_with_queue_full():
    scheduler = _scheduler(max_waiting=2)
    scheduler.add(Sequence("a", [1], SamplingParams()))
    scheduler.add(Sequence("b", [1], SamplingParams()))
    with pytest.raises(QueueFullError, match="waiting queue full"):
        scheduler.add(Sequence("c", [1], SamplingParams()))


def test_finish_releases_pages_and_slots_from_either_queue():
    scheduler = _scheduler(max_num_batched_tokens=4, max_prefill_seqs=1)
    a, b = Sequence("a", [1, 2, 3], SamplingParams()), Sequence("b", [4, 5], SamplingParams())
    scheduler.add(a)
    scheduler.add(b)
    scheduler.schedule()
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    scheduler.finish(a, FinishReason.ABORT)
    scheduler.finish(b, FinishReason.ABORT)
    assert scheduler.num_unfinished == 0 and scheduler.block_manager.num_free == 64
    assert sorted(scheduler._free_slots) == [0, 1, 2, 3]


def test_step_shapes_use_fine_kv_buckets_for_decode_only_steps():
    from jaxinfer.engine.batch import StepShape, all_step_shapes, step_shape
    from jaxinfer.engine.scheduler import PrefillChunk, SchedulerOutput

    config = SchedulerConfig().resolve(8192)
    assert config.decode_kv_buckets == (256, 512, 1024, 2048, 4096, 8192)
    assert config.kv_buckets == (256, 1024, 4096, 8192) and config.mixed_kv_buckets == (1024, 8192)
    decoding = Sequence("d", list(range(3, 303)), SamplingParams())
    decoding.num_computed = 300  # context 301: bucket 512 alone, 1024 beside a prompt chunk
    prompt = Sequence("p", list(range(3, 43)), SamplingParams())
    alone = step_shape(SchedulerOutput([decoding], [], []), config)
    mixed = step_shape(SchedulerOutput([decoding], [PrefillChunk(prompt, 0, 40)], []), config)
    assert alone == StepShape(1, 512, 0, 0)
    assert mixed == StepShape(1, 1024, 256, 1024)
    shapes = all_step_shapes(config)
    assert alone in shapes and mixed in shapes and len(shapes) == len(set(shapes))
    explicit = SchedulerConfig(kv_buckets=(64, 256)).resolve(256)
    assert explicit.decode_kv_buckets == (64, 256)  # given KV buckets are not refined behind the user's back


def _decoding(scheduler, count, prompt_len=5, max_tokens=100):
    """count requests admitted, prefilled and decoding (one output token each)."""
    for i in range(count):
        scheduler.add(Sequence(str(i), list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens)))
    while scheduler.waiting or any(not s.is_decoding for s in scheduler.running):
        _complete(scheduler, scheduler.schedule())
    return scheduler.running


def test_decode_only_steps_become_bursts_within_each_rows_budget():
    scheduler = _scheduler(decode_steps=8, max_model_len=20)
    short, long_ = _decoding(scheduler, 2, prompt_len=5)
    short.params = SamplingParams(max_tokens=3)  # 1 of 3 tokens out: 2 more at most
    out = scheduler.schedule()
    assert out.burst and out.decodes == [short, long_]
    # long: the context limit (20) allows 20 - 6 = 14 more, decode_steps caps at 8
    assert out.steps == [2, 8]
    # each row holds pages for every token its burst may write: positions 5 .. 5 + steps - 1
    assert len(short.pages) == 2 and len(long_.pages) == 4


def test_no_burst_while_a_waiting_request_could_be_admitted():
    scheduler = _scheduler(decode_steps=8)
    _decoding(scheduler, 2)
    scheduler.add(Sequence("new", [5, 6], SamplingParams()))  # a slot is free: admitted next step
    out = scheduler.schedule()
    assert not out.burst and [c.seq.request_id for c in out.prefills] == ["new"]

    full = _scheduler(decode_steps=8, max_num_seqs=2)
    _decoding(full, 2)
    full.add(Sequence("late", [5, 6], SamplingParams()))  # no free slot until a running request ends
    assert full.schedule().burst


def test_no_burst_when_its_pages_are_not_free():
    scheduler = _scheduler(num_pages=5, decode_steps=8)
    first, second = _decoding(scheduler, 2)  # 2 pages each; 8 steps would need 2 more each, 1 is free
    out = scheduler.schedule()
    assert not out.burst and out.decodes == [first, second] and out.steps == []
    assert scheduler.block_manager.num_free == 1


def test_decode_steps_one_never_bursts():
    scheduler = _scheduler(decode_steps=1)
    _decoding(scheduler, 2)
    assert not scheduler.schedule().burst


def test_decode_row_holding_pages_past_its_kv_bucket_reads_only_those_inside():
    """A row may hold pages a burst reserved and did not use; the step's page table has only the KV
    bucket's width, so the builder copies the pages the row reads (it raised ValueError on main)."""
    from jaxinfer.engine.batch import BatchBuilder, step_shape
    from jaxinfer.engine.scheduler import SchedulerOutput

    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, decode_kv_buckets=(32, 64)).resolve(64)
    seq = Sequence("r", list(range(1, 21)), SamplingParams(max_tokens=30, seed=0))
    seq.pages, seq.num_computed, seq.slot = [5, 6, 7], 20, 0  # 3 pages of 16 for 21 tokens: the third is spare
    seq.output_ids = [9]
    out = SchedulerOutput([seq], [], [])
    shape = step_shape(out, config)
    assert shape.decode_kv_tokens == 32
    step = BatchBuilder(config, 16, 8).build(out, shape, impl="xla", interpret=True)
    assert np.asarray(step.meta.decode_page_indices).tolist() == [[5, 6]]
    assert int(step.meta.slot_mapping[0]) == 6 * 16 + 4
