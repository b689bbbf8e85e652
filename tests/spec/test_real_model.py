"""The shipped draft head on the real model: speculative greedy decoding (EAGLE tree and HeteroSpec
policy) gives exactly the independent reference's greedy tokens, and the head's drafts are
accepted."""

import dataclasses

import numpy as np
import pytest

from jaxinfer.config import SpeculativeConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.draft_head import prepare_speculative
from tests.serve.test_real_model import must_match

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("method", ["eagle", "heterospec"])
def test_speculative_greedy_equals_the_reference(method, real_model, real_engine, reference_data):
    spec, head = prepare_speculative(SpeculativeConfig(method=method, max_batch=4, adaptive=False), "smollm2-135m")
    config = dataclasses.replace(real_engine.config, speculative=spec)
    engine = Engine(real_model.model, real_model.tokenizer, config, draft_head=head)
    cases = list(reference_data["cases"].values())
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    outputs = engine.generate([c["prompt_ids"] for c in cases], params)
    compared = 0
    for case, output in zip(cases, outputs, strict=True):
        n = min(48, must_match(case))
        assert output.output_ids[:n] == case["greedy_new_ids"][:n]
        compared += n
    assert compared >= 64  # of the 3 x 48 tokens, those before each case's first near-tie (78)
    stats = engine.spec.stats
    assert stats.rounds > 0 and stats.accepted_tokens > stats.rounds // 2
    if method == "heterospec":
        assert sum(engine.spec.drafter.bin_counts) == stats.requests


@pytest.fixture(scope="module")
def fast_path():
    """The Q4_1 model with the CPU kernels, two prompts, and a run of the engine with a speculation method
    (plain decoding's outputs computed once for both methods)."""
    from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig
    from jaxinfer.datasets import prompt_set
    from jaxinfer.layers import quant
    from jaxinfer.loader import load_model

    if not quant.kernels_available():
        pytest.skip("the CPU kernels are unavailable here")
    loaded = load_model("smollm2-135m", "auto")
    # drawn at random from sets no draft head training, tuning or calibration reads: HumanEval, and GSM8K
    # test lines past the draft head's held-out split (which reads at most the first ~700)
    rng = np.random.default_rng(1204)  # a fixed draw: the test is deterministic
    picks = [("humaneval", int(rng.integers(0, 164))), ("gsm8k", int(rng.integers(760, 1319)))]
    texts = [prompt_set(name, index, 1).prompts[0] for name, index in picks]
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": text}]) for text in texts]
    scheduler = SchedulerConfig(max_num_seqs=2, max_model_len=1024, decode_buckets=(1, 2), prefill_buckets=(256,),
                                kv_buckets=(1024,))
    params = SamplingParams(max_tokens=48, ignore_eos=True)

    def run(name):
        spec, head = prepare_speculative(SpeculativeConfig(method=name, num_nodes=8, adaptive=False), "smollm2-135m")
        engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(cache=CacheConfig(num_pages=256),
                                                                     scheduler=scheduler, speculative=spec), head)
        return [o.output_ids for o in engine.generate(prompts, params)], engine

    return picks, run, run("off")[0]


@pytest.mark.parametrize("method", ["ngram", "heterospec"])
def test_speculation_on_the_cpu_fast_path_reproduces_plain_decoding(method, fast_path):
    """Q4_1 weights with int8 activations: verification runs each request's draft nodes as several rows,
    plain decoding one row; every row-wise op gives the same bits either way (jaxinfer.cpu.rows, the tree
    kernel), so the outputs are the same tokens. (Before, they parted after 10-22 tokens on every prompt:
    a few ulps from XLA's shape-dependent norm and rotary code, amplified by the int8 rounding.)"""
    picks, run, plain = fast_path
    outputs, engine = run(method)
    assert engine.spec.stats.accepted_tokens > 0
    assert outputs == plain, f"prompts {picks}"


def test_a_prefix_cache_hit_changes_no_token_on_the_cpu_fast_path():
    """The same prompts again hit the prefix cache: their uncached tails run as short prompt chunks, which
    give every row the bits the long chunk gave (before: replies parted 16-44 tokens in)."""
    from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig
    from jaxinfer.datasets import prompt_set
    from jaxinfer.layers import quant
    from jaxinfer.loader import load_model

    if not quant.kernels_available():
        pytest.skip("the CPU kernels are unavailable here")
    loaded = load_model("smollm2-135m", "auto")
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": text}])
               for text in prompt_set("mt_bench", 0, 3).prompts]
    scheduler = SchedulerConfig(max_num_seqs=2, max_model_len=1024, decode_buckets=(1, 2), prefill_buckets=(64, 256),
                                kv_buckets=(1024,))
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(cache=CacheConfig(num_pages=256), scheduler=scheduler))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    first = [engine.generate([p], params)[0].output_ids for p in prompts]
    hits = engine.block_manager.prefix_hit_tokens
    again = [engine.generate([p], params)[0].output_ids for p in prompts]
    assert engine.block_manager.prefix_hit_tokens - hits >= 3 * 48  # whole pages of every prompt came cached
    assert again == first
