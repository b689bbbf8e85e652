"""Blocked prefill of long prompts: scheduling of blocked steps, and the engine's outputs with the
UniSparse and dense blocked backends against the ordinary paged prefill."""

import threading

import jax
import pytest

from jaxinfer.config import SchedulerConfig, SparsePrefillConfig, UniSparseConfig
from jaxinfer.engine.batch import StepShape
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.sequence import Sequence
from jaxinfer.sampling_params import SamplingParams
from tests.engine import tiny_engine
from tests.engine.test_scheduler import _complete

BLOCK = 8
LONG = [3 + (i * 7) % 60 for i in range(44)]  # 44 tokens: long (> 20)
LONG_2 = [3 + (i * 11) % 60 for i in range(37)]
SHORT = [[5, 6, 7, 8, 9], [40, 41, 42]]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def _scheduler(num_pages=64, page_size=4, **overrides):
    config = SchedulerConfig(**{**dict(max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=2), **overrides})
    return Scheduler(config.resolve(256), BlockManager(num_pages, page_size), long_prompt_len=20, block_size=BLOCK)


def test_long_prompt_chunks_run_alone_on_block_boundaries_and_alternate_with_decodes():
    scheduler = _scheduler()
    scheduler.add(Sequence("short", SHORT[0], SamplingParams()))
    out = scheduler.schedule()  # nothing long yet: an ordinary step
    assert not out.blocked and out.prefills[0].seq.request_id == "short"
    _complete(scheduler, out)
    scheduler.add(Sequence("long", LONG, SamplingParams()))
    kinds, starts = [], []
    while True:
        out = scheduler.schedule()
        if out.empty:
            break
        kinds.append("blocked" if out.blocked else "mixed")
        if out.blocked:
            assert not out.decodes and len(out.prefills) == 1 and out.prefills[0].seq.request_id == "long"
            starts.append(out.prefills[0].start)
        else:
            assert all(c.seq.request_id != "long" for c in out.prefills)
        _complete(scheduler, out)
        if len(kinds) > 12:
            break
    assert starts == [0, 16, 32] and all(s % BLOCK == 0 for s in starts)
    # blocked and ordinary (decode) steps alternate while both have work
    assert kinds[:6] == ["blocked", "mixed", "blocked", "mixed", "blocked", "mixed"]


def test_prefix_hit_off_a_block_boundary_first_runs_an_ordinary_chunk_to_the_boundary():
    scheduler = _scheduler()
    first = Sequence("a", LONG, SamplingParams())
    scheduler.add(first)
    while not first.is_decoding:
        _complete(scheduler, scheduler.schedule())
        scheduler.block_manager.commit(first)
    scheduler.finish(first, "stop")  # its 11 full pages (44 tokens) stay cached
    again = Sequence("b", LONG[:42] + [9, 9, 9, 9], SamplingParams())  # 10 pages (40 tokens) hit
    scheduler.add(again)
    out = scheduler.schedule()
    assert out.blocked and out.prefills[0].start == 40  # 40 is a block boundary: blocked at once
    third = Sequence("c", LONG[:38] + [9] * 20, SamplingParams())  # 9 pages hit: starts at 36
    scheduler.add(third)
    _complete(scheduler, out)
    out = scheduler.schedule()  # after a blocked step, an ordinary one
    chunk = next(c for c in out.prefills if c.seq is third)
    assert not out.blocked and chunk.start == 36 and (chunk.start + chunk.num_tokens) % BLOCK == 0


def test_opted_out_and_short_prompts_never_get_blocked_steps():
    scheduler = _scheduler()
    scheduler.add(Sequence("out", LONG, SamplingParams(sparse_prefill=False)))
    scheduler.add(Sequence("short", SHORT[1], SamplingParams()))
    for _ in range(6):
        out = scheduler.schedule()
        assert not out.blocked
        _complete(scheduler, out)


def _engine(mode, **unisparse):
    cfg = UniSparseConfig(**{**dict(local_blocks=1, c_h=1, block_size=BLOCK, c_q=4, c_k=4, tau=0.5), **unisparse})
    return tiny_engine.engine(max_num_batched_tokens=16, prefill_buckets=(8, 16), kv_buckets=(16, 32, 64),
                              sparse_prefill=SparsePrefillConfig(mode=mode, min_len=20, unisparse=cfg))


@pytest.fixture(scope="module")
def paged_outputs():
    eng = _engine("off")
    return [r.output_ids for r in eng.generate([LONG, SHORT[0], LONG_2, SHORT[1]], GREEDY)]


@pytest.mark.parametrize(("mode", "unisparse"), [
    ("dense_blocked", {}),
    ("sparse", dict(local_blocks=8)),  # every causal block forced: exactly dense
])
def test_blocked_backends_without_dropped_blocks_equal_paged_prefill(paged_outputs, mode, unisparse):
    eng = _engine(mode, **unisparse)
    results = eng.generate([LONG, SHORT[0], LONG_2, SHORT[1]], GREEDY)
    assert [r.output_ids for r in results] == paged_outputs
    assert any(isinstance(key, StepShape) and key.blocked for key in eng.runner.executables())
    tiny_engine.assert_no_leaks(eng)


def test_sparse_backend_runs_with_prefix_hits_and_per_request_opt_out(paged_outputs):
    eng = _engine("sparse", tau=0.3, sink_blocks=0)
    results = eng.generate([LONG, SHORT[0], LONG_2, SHORT[1]], GREEDY)
    assert all(len(r.output_ids) == 8 for r in results)
    assert [results[1].output_ids, results[3].output_ids] == [paged_outputs[1], paged_outputs[3]]
    dense = eng.generate([LONG, LONG_2], SamplingParams(max_tokens=8, ignore_eos=True, sparse_prefill=False))
    assert [r.output_ids for r in dense] == [paged_outputs[0], paged_outputs[2]]
    again = eng.generate([LONG[:40] + [7, 7, 7]], GREEDY)  # a prefix-cache hit of 40 tokens
    assert again[0].metrics.num_cached_tokens == 40
    tiny_engine.assert_no_leaks(eng)


def test_config_is_validated():
    with pytest.raises(ValueError, match="sparse prefill mode"):
        SparsePrefillConfig(mode="fast")
    with pytest.raises(ValueError, match="min_len"):
        SparsePrefillConfig(min_len=-1)
    with pytest.raises(ValueError, match="sparse_prefill must be a bool"):
        SamplingParams(sparse_prefill="yes")
    with pytest.raises(ValueError, match="at least the sparse prefill block size"):
        Scheduler(SchedulerConfig(max_num_batched_tokens=32).resolve(256), BlockManager(64, 4),
                  long_prompt_len=100, block_size=64)


def test_a_long_prompt_during_background_warm_up_waits_for_the_blocked_compile(paged_outputs, monkeypatch):
    from jaxinfer.engine import model_runner

    eng = _engine("dense_blocked")
    lowered_on = []  # (thread, key) of every compile actually run
    abstract = model_runner._abstract
    compile_ = eng.runner._compile
    current = threading.local()

    def record(key, *args):
        current.key = key
        return compile_(key, *args)

    def traced(leaf):
        if getattr(current, "key", None) is not None:
            lowered_on.append((threading.current_thread().name, current.key))
            current.key = None
        return abstract(leaf)
    monkeypatch.setattr(model_runner, "_abstract", traced)
    eng.runner._compile = record
    blocked_started, release = threading.Event(), threading.Event()
    lower = jax.stages.Traced.lower

    def held_lower(self, *args, **kwargs):  # the background thread's blocked compile waits for the request
        if threading.current_thread().name == "jaxinfer-compile" and not blocked_started.is_set():
            blocked_started.set()
            assert release.wait(60)
        return lower(self, *args, **kwargs)
    monkeypatch.setattr(jax.stages.Traced, "lower", held_lower)
    thread = eng.warm_up(background=True)
    # ready without it: the foreground part of the warm-up compiled no blocked step (the background thread
    # may already have traced one by now)
    assert all(not shape.blocked for name, shape in lowered_on
               if isinstance(shape, StepShape) and name != "jaxinfer-compile")
    assert blocked_started.wait(60)
    results = []
    worker = threading.Thread(target=lambda: results.extend(eng.generate([LONG], GREEDY)), name="requests")
    worker.start()
    worker.join(2)
    assert worker.is_alive() and not results  # waiting for the compile in progress
    release.set()
    worker.join(120)
    thread.join(120)
    assert [r.output_ids for r in results] == paged_outputs[:1]
    assert not [key for name, key in lowered_on if name == "requests"]  # nothing compiled on the request path
    keys = [key for _, key in lowered_on]
    assert len(keys) == len(set(keys))  # and nothing twice
    tiny_engine.assert_no_leaks(eng)
