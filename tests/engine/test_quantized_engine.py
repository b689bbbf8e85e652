"""The engine with quantized weights (GGUF blocks run by the CPU kernels, int8 activations): the
batching, chunking, prefix-cache, preemption, speculation and compile-budget guarantees of the float
engine hold unchanged."""

import random

import jax
import pytest

from jaxinfer.config import SpeculativeConfig
from jaxinfer.layers import quant
from jaxinfer.layers.linear import QuantLinear, QuantSpec
from jaxinfer.sampling_params import SamplingParams
from tests.engine import tiny_engine
from tests.engine.test_engine import GREEDY, PROMPTS

pytestmark = pytest.mark.skipif(not quant.kernels_available(), reason="the CPU kernels are unavailable here")

Q8 = QuantSpec("q8_0", "q8_0", "int8")
Q4 = QuantSpec("q4_1", "q8_0", "int8")


@pytest.fixture(scope="module", params=[Q8, Q4], ids=["q8_0", "q4_1"])
def spec(request):
    return request.param


@pytest.fixture(scope="module")
def alone(spec):
    eng = tiny_engine.engine(quant_spec=spec)
    return [eng.generate([p], GREEDY)[0].output_ids for p in PROMPTS]


def test_the_model_runs_on_blocks(spec):
    model = tiny_engine.model(spec)
    assert isinstance(model.layers[0].mlp.down_proj, QuantLinear)
    assert model.embed_tokens[...].dtype == jax.numpy.uint8 and model.layers[0].mlp.down_proj.qtype == spec.linear


@pytest.mark.parametrize("variant", [
    dict(),  # chunked prefill (16-token budget), prefix caching
    dict(enable_prefix_caching=False),
    dict(enable_chunked_prefill=False, max_num_batched_tokens=64, prefill_buckets=(64,)),
    dict(num_pages=16),  # preemption by recompute
])
def test_batch_equals_each_prompt_alone(spec, alone, variant):
    eng = tiny_engine.engine(quant_spec=spec, **variant)
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in results] == alone
    tiny_engine.assert_no_leaks(eng)
    if variant.get("num_pages") == 16:
        assert eng.scheduler.num_preemptions > 0
    if variant == {}:
        assert eng.metrics().prefix_cache_hit_rate > 0


def test_ngram_speculation_equals_plain_greedy(spec, alone):
    eng = tiny_engine.engine(quant_spec=spec, speculative=SpeculativeConfig(method="ngram", depth=4, num_nodes=8,
                                                                            adaptive=False))
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in results] == alone
    assert eng.spec.stats.rounds > 0
    tiny_engine.assert_no_leaks(eng)


def test_zero_compiles_after_warm_up(spec):
    eng = tiny_engine.engine(quant_spec=spec, num_pages=24, decode_buckets=(1, 2, 4), prefill_buckets=(8, 16),
                             kv_buckets=(16, 64))
    eng.warm_up()
    compiled = eng.runner.num_compiles
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 64) for _ in range(rng.randrange(1, 50))] for _ in range(5)]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randrange(1, 14), seed=i)
              for i in range(len(prompts))]
    eng.generate(prompts, params)
    assert eng.runner.num_compiles == compiled
    tiny_engine.assert_no_leaks(eng)
