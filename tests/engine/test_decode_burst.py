"""Bursts of decode steps in one device call: the same tokens, logprobs, stops and page accounting
as one step per call, and the device ends a row at its stop token (tiny random model)."""

import numpy as np
import pytest

from jaxinfer.sampling_params import SamplingParams
from tests.engine import tiny_engine
from tests.engine.tiny_engine import EOS

PROMPTS = [[7, 8, 9], list(range(3, 30)), [5, 9, 30, 41], list(range(20, 40)), [11] * 6, [4, 5]]


def mixed_params(stop_token):
    return [
        SamplingParams(max_tokens=20, ignore_eos=True),
        SamplingParams(max_tokens=17, temperature=0.9, top_k=8, seed=3, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.4,
                       presence_penalty=0.2, seed=5),
        SamplingParams(max_tokens=30, stop_token_ids=[stop_token], logprobs=2),
        SamplingParams(max_tokens=30, stop=["ab"], temperature=1.0, seed=9),
        SamplingParams(max_tokens=3, ignore_eos=True),
    ]


def recorded(engine):
    """Record the steps each row of every burst ran, in the order the bursts were collected."""
    calls, rows, runner = [], {}, engine.runner
    dispatch, collect = runner.dispatch_burst, runner.collect

    def dispatch_burst(out, shape, after=None):
        handle = dispatch(out, shape, after)
        rows[id(handle)] = len(out.decodes)
        return handle

    def collect_burst(handle):
        result = collect(handle)
        calls.append(result.counts[:rows.pop(id(handle))].tolist())
        return result
    runner.dispatch_burst, runner.collect = dispatch_burst, collect_burst
    return calls


def outputs(results):
    def logprobs(r):
        return [(lp.token_id, round(lp.logprob, 4), {k: round(v, 4) for k, v in lp.top.items()})
                for lp in r.logprobs or []]
    return [(r.output_ids, r.finish_reason, r.text, logprobs(r)) for r in results]


@pytest.fixture(scope="module")
def stop_token():
    """A token that greedy decoding of PROMPTS[3] first emits at output index 4 or later."""
    ids = tiny_engine.engine(decode_steps=1).generate([PROMPTS[3]], SamplingParams(max_tokens=30))[0].output_ids
    return next(t for i, t in enumerate(ids) if i >= 4 and t not in ids[:i] and t != EOS)


@pytest.mark.parametrize("variant", [dict(), dict(num_pages=16)])  # 16 pages: preemption under bursts
def test_bursts_give_what_single_steps_give(stop_token, variant):
    single = tiny_engine.engine(decode_steps=1, **variant)
    expected = single.generate(PROMPTS, mixed_params(stop_token))
    engine = tiny_engine.engine(decode_steps=8, **variant)
    calls = recorded(engine)
    results = engine.generate(PROMPTS, mixed_params(stop_token))
    assert outputs(results) == outputs(expected)
    assert results[3].finish_reason == "stop" and results[3].output_ids[-1] == stop_token
    assert any(max(counts) > 1 for counts in calls)
    tiny_engine.assert_no_leaks(engine)
    if variant:
        assert engine.scheduler.num_preemptions > 0


def test_device_ends_a_row_at_its_stop_token_and_the_call_when_no_row_runs(stop_token):
    engine = tiny_engine.engine(decode_steps=16, max_model_len=64)
    calls = recorded(engine)
    result = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=30, stop_token_ids=[stop_token]))[0]
    position = result.output_ids.index(stop_token)
    assert result.finish_reason == "stop" and len(result.output_ids) == position + 1
    bursts = [counts[0] for counts in calls]
    # the first token comes from the prefill step; the bursts ran exactly the steps up to the stop,
    # the one that met it ended there (a burst chained after it, dispatched before the host saw the
    # stop, ran no step)
    last = max(i for i, n in enumerate(bursts) if n)
    assert sum(bursts) == position and bursts[last] < 16 and not any(bursts[last + 1:])
    tiny_engine.assert_no_leaks(engine)


def test_burst_respects_max_tokens_and_the_context_limit():
    engine = tiny_engine.engine(decode_steps=8, max_model_len=32)
    calls = recorded(engine)
    prompt = list(range(3, 23))  # 20 tokens: the context limit leaves 12 to generate
    results = engine.generate([prompt, [5, 6]], [SamplingParams(max_tokens=100, ignore_eos=True),
                                                 SamplingParams(max_tokens=5, ignore_eos=True)])
    assert [len(r.output_ids) for r in results] == [12, 5]
    assert [r.finish_reason for r in results] == ["length", "length"]
    steps = np.array([counts for counts in calls if len(counts) == 2])
    assert steps[:, 1].sum() <= 4 and steps.max() <= 8  # the short request's budget, never past decode_steps
    tiny_engine.assert_no_leaks(engine)


def test_pages_a_burst_filled_join_the_prefix_cache():
    """A burst's generated tokens land in the prefix cache under the hash of those tokens: a follow-up
    whose prompt repeats them reuses the pages and decodes what an engine without the cache decodes."""
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    engine = tiny_engine.engine(decode_steps=8)
    calls = recorded(engine)
    first = engine.generate([PROMPTS[0]], greedy)[0].output_ids
    assert any(max(counts) > 1 for counts in calls)
    follow_up = PROMPTS[0] + first[:13]  # 16 tokens: its first 3 pages of 4 can come from the cache
    hits = engine.block_manager.prefix_hit_tokens
    expected = tiny_engine.engine(decode_steps=1, enable_prefix_caching=False).generate([follow_up], greedy)
    assert engine.generate([follow_up], greedy)[0].output_ids == expected[0].output_ids
    assert engine.block_manager.prefix_hit_tokens == hits + 12
    tiny_engine.assert_no_leaks(engine)
