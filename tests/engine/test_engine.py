"""Engine end to end on a tiny model: batching invariance, prefix caching, preemption, aborts,
sampling reproducibility, stops, logprobs, validation and the compile budget."""

import random
import threading

import jax
import numpy as np
import pytest

from jaxinfer.config import SpeculativeConfig
from jaxinfer.sampling_params import SamplingParams
from tests.engine import tiny_engine

SYSTEM = list(range(10, 22))  # 12 tokens = 3 full pages shared by several prompts
PROMPTS = [[7], SYSTEM + [40, 41], list(range(3, 33)), SYSTEM + [50], [5, 9, 30, 41], list(range(20, 60))[:37],
           SYSTEM + [44, 45, 46, 47, 48, 49]]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def base():
    return tiny_engine.engine()


@pytest.fixture(scope="module")
def alone(base):
    return [base.generate([p], GREEDY)[0].output_ids for p in PROMPTS]


@pytest.mark.parametrize("variant", [
    dict(),  # chunked prefill (16-token budget), prefix caching
    dict(enable_prefix_caching=False),
    dict(enable_chunked_prefill=False, max_num_batched_tokens=64, prefill_buckets=(64,)),
    dict(num_pages=16),  # 64 slots for 7 requests of up to 49 tokens: preemption by recompute
])
def test_batch_equals_each_prompt_alone(alone, variant):
    eng = tiny_engine.engine(**variant)
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in results] == alone
    assert all(r.finish_reason == "length" and len(r.output_ids) == 12 for r in results)
    tiny_engine.assert_no_leaks(eng)
    if variant.get("num_pages") == 16:
        assert eng.scheduler.num_preemptions > 0
    if variant == {}:
        assert eng.metrics().prefix_cache_hit_rate > 0
        assert any(r.metrics.num_cached_tokens >= 8 for r in results)


def test_pallas_kernel_engine_equals_reference_engine(alone):
    """The engine with the Pallas ragged paged-attention kernel (interpret mode on CPU) for decode
    and mixed steps gives the same greedy tokens as with the jnp reference."""
    eng = tiny_engine.engine(attention_impl="pallas")
    assert eng.runner.impl == "pallas" and eng.runner.interpret
    results = eng.generate(PROMPTS[:4], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [r.output_ids for r in results] == [a[:6] for a in alone[:4]]


def test_abort_frees_pages_of_running_and_waiting_requests(base):
    ids = [base.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in PROMPTS]
    for _ in range(3):
        base.step()
    running = base.scheduler.running[0].request_id
    waiting = base.scheduler.waiting[-1].request_id
    for request_id in (running, waiting):
        final = base.abort(request_id)
        assert final.finished and final.finish_reason == "abort"
    assert base.abort("no-such-request") is None
    finished = {running, waiting}
    while base.has_unfinished:
        finished.update(o.request_id for o in base.step() if o.finished)
    assert finished == set(ids)
    tiny_engine.assert_no_leaks(base)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(base):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=10, ignore_eos=True) for s in (1, 2, 3)]
    batch = [r.output_ids for r in base.generate(PROMPTS[:3], params)]
    alone = [base.generate([p], q)[0].output_ids for p, q in zip(PROMPTS[:3], params, strict=False)]
    assert batch == alone
    other_seed = base.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=10,
                                                              ignore_eos=True))[0].output_ids
    assert other_seed != alone[0]


def test_a_request_without_a_seed_gets_a_fresh_random_one(base):
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    first, second = base.generate([PROMPTS[2]] * 2, unseeded)
    assert first.output_ids != second.output_ids
    seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=4)
    first, second = base.generate([PROMPTS[2]] * 2, seeded)
    assert first.output_ids == second.output_ids


def test_penalties_follow_each_request_through_batching_and_preemption(alone):
    params = SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=1.0,
                            presence_penalty=0.5)
    eng = tiny_engine.engine()
    single = [eng.generate([p], params)[0].output_ids for p in PROMPTS[:4]]
    assert single != alone[:4]  # the penalties change greedy output
    for r in single:  # frequency + presence penalties of this size make repeats rare
        assert len(set(r)) >= 6
    crowded = tiny_engine.engine(num_pages=16)
    mixed = crowded.generate(PROMPTS[:4] + PROMPTS[4:], [params] * 4 + [GREEDY] * 3)
    assert [r.output_ids for r in mixed[:4]] == single
    assert [r.output_ids for r in mixed[4:]] == alone[4:]
    tiny_engine.assert_no_leaks(crowded)


def test_stop_token_ids_and_eos(base):
    reference = base.generate([PROMPTS[2]], GREEDY)[0].output_ids
    stop_at = reference[4]
    first = reference.index(stop_at)
    result = base.generate([PROMPTS[2]], SamplingParams(max_tokens=12, stop_token_ids=[stop_at]))[0]
    assert result.output_ids == reference[:first + 1] and result.finish_reason == "stop"


def test_stop_strings_cut_the_text_and_never_leak_past_it(base):
    reference = base.generate([PROMPTS[3]], GREEDY)[0]
    text = reference.text
    stop = text[5:8]
    cut = text.find(stop)
    deltas = []
    result = base.generate([PROMPTS[3]], SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop, "zzzzzz"]),
                           on_output=lambda o: deltas.append(o.new_text))[0]
    assert result.text == text[:cut] and "".join(deltas) == text[:cut]
    assert result.finish_reason == "stop"
    assert len(result.output_ids) < 12


def test_logprobs_of_greedy_tokens(base):
    result = base.generate([PROMPTS[1]], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3))[0]
    assert len(result.logprobs) == 6
    for entry, token in zip(result.logprobs, result.output_ids, strict=False):
        assert entry.token_id == token and len(entry.top) == 3
        best = max(entry.top, key=entry.top.get)
        assert best == token and entry.top[token] == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.logprob <= 0 and sum(np.exp(list(entry.top.values()))) <= 1 + 1e-5
    assert base.generate([PROMPTS[1]], GREEDY)[0].logprobs is None


@pytest.mark.parametrize("prompt, params, fragment", [
    ([], {}, "prompt is empty"),
    ("", {}, "prompt is empty"),
    ([5] * 64, {}, "context limit of 64"),
    ([5, 64], {}, "outside the vocabulary"),
    ([5, 6], {"logprobs": 6}, "exceeds the maximum of 5"),
    ([5, 6], {"stop_token_ids": [70]}, "stop token id 70"),
    (5, {}, "string or a list of token ids"),
])
def test_bad_requests_raise_before_scheduling(base, prompt, params, fragment):
    with pytest.raises(ValueError, match=fragment):
        base.add_request(prompt, SamplingParams(**params))
    assert not base.has_unfinished


@pytest.mark.parametrize("params, fragment", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(stop=42), "stop must be a string or a list of strings"),
    (dict(stop=["a", 3]), "stop must be"), (dict(min_p=2.0), "min_p"), (dict(top_k=-1), "top_k"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed=-1), "seed"), (dict(logprobs=-1), "logprobs"), (dict(stop=["x"] * 65), "at most 64"),
])
def test_bad_sampling_params_raise(params, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**params)


def test_generate_validates_every_request_before_running_any(base):
    with pytest.raises(ValueError, match="prompt is empty"):
        base.generate([[5, 6], []], GREEDY)
    assert not base.has_unfinished and base.block_manager.num_free == base.block_manager.num_pages


@pytest.mark.parametrize("speculative", [None, SpeculativeConfig(method="ngram", num_nodes=4, max_batch=2,
                                                                    adaptive=False)], ids=["plain", "ngram"])
def test_zero_compiles_after_warm_up(speculative):
    """The compile budget: warm-up compiles exactly the compile plan, and a mixed workload (rounds
    among them) compiles nothing more."""
    eng = tiny_engine.engine(num_pages=24, decode_buckets=(1, 2, 4), prefill_buckets=(8, 16), kv_buckets=(16, 64),
                             speculative=speculative)
    eng.warm_up()
    compiled = eng.runner.num_compiles
    plan = eng.compile_plan()
    assert compiled == len(plan)
    assert (plan.describe()["programs"] > 0) == (speculative is not None)
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_a, **_k: events.append(name) if "backend_compile" in name else None)
    # the session's compilation cache (tests/conftest.py): a program it holds is loaded, not compiled
    jax.monitoring.register_event_listener(
        lambda name, *_a, **_k: events.append(name) if "compile_requests_use_cache" in name else None)
    rng = random.Random(0)
    for _ in range(3):
        prompts = [[rng.randrange(3, 64) for _ in range(rng.randrange(1, 50))] for _ in range(rng.randrange(1, 7))]
        params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([0, 5]),
                                 min_p=rng.choice([0.0, 0.1]), repetition_penalty=rng.choice([1.0, 1.3]),
                                 logprobs=rng.choice([None, 2]), max_tokens=rng.randrange(1, 14), seed=i)
                  for i in range(len(prompts))]
        eng.generate(prompts, params)
    eng.generate([[5, 6, 7] * 6, [9, 4] * 5], SamplingParams(max_tokens=12))  # repeats: something to draft
    assert eng.runner.num_compiles == compiled
    assert events == []
    if speculative is not None:
        assert eng.spec.stats.rounds > 0
    tiny_engine.assert_no_leaks(eng)


def test_metrics_snapshot(base):
    request_id = base.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    base.step()
    metrics = base.metrics()
    assert metrics.num_running == 1 and metrics.num_waiting == 0
    assert metrics.context_lengths == {request_id: 4}
    assert metrics.kv_pages_used == 1 and metrics.kv_pages_used + metrics.kv_pages_free == metrics.kv_pages_total
    assert metrics.last_step_tokens == 3 and metrics.last_step_seconds > 0
    while base.has_unfinished:
        base.step()


def test_background_warm_up_serves_at_once_on_padded_shapes_and_never_compiles_on_the_request_path(alone):
    eng = tiny_engine.engine(decode_buckets=(1, 2, 4), prefill_buckets=(8, 16), kv_buckets=(16, 64))
    compiled_on = []
    compile_ = eng.runner._compile

    def record(key, *args):
        compiled_on.append(threading.current_thread().name)
        return compile_(key, *args)
    eng.runner._compile = record
    gate = threading.Event()
    warm_up_rest = eng.runner.warm_up

    def held_back(progress=None, shapes=None, stop=None):  # the background part waits for the requests
        if threading.current_thread().name == "jaxinfer-compile":
            gate.wait(60)
        warm_up_rest(progress, shapes, stop)
    eng.runner.warm_up = held_back
    thread = eng.warm_up(background=True)
    assert len(eng.runner.largest_shapes()) == 3  # decode, prompt, mixed
    results = []
    worker = threading.Thread(target=lambda: results.extend(eng.generate(PROMPTS, GREEDY)), name="requests")
    worker.start()
    worker.join(120)
    gate.set()
    thread.join(120)
    assert [r.output_ids for r in results] == alone  # padded shapes give the very same tokens
    assert "requests" not in compiled_on and "jaxinfer-compile" in compiled_on
    full = tiny_engine.engine(decode_buckets=(1, 2, 4), prefill_buckets=(8, 16), kv_buckets=(16, 64))
    full.warm_up()
    assert eng.runner.num_compiles == full.runner.num_compiles  # then every shape is compiled once
    tiny_engine.assert_no_leaks(eng)


def test_close_stops_a_background_warm_up_after_the_shape_it_compiles():
    eng = tiny_engine.engine(decode_buckets=(1, 2, 4), prefill_buckets=(8, 16), kv_buckets=(16, 64))
    thread = eng.warm_up(background=True)
    compiled = eng.runner.num_compiles
    eng.close()
    assert not thread.is_alive()
    # at most the shape (and its sampler) being compiled when close came
    assert eng.runner.num_compiles <= compiled + 2
    assert eng.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"  # still serves, padded
