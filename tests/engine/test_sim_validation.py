"""The simulator against the real cluster: the same small workload served by two real replica
engines (tiny model) and simulated with a cost model profiled from those engines and fitted to the
run's own step times; over three trials (the third run only where it can decide) the median ratio of
simulated to real mean E2E must be within 15% of 1 and of mean TTFT within 20%, on a Poisson workload
and on slices of the Azure conversation trace."""

import asyncio
import time

import numpy as np
import pytest

from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.models import init_random
from jaxinfer.replicas.cluster import Cluster
from jaxinfer.replicas.placement import replica_meshes
from jaxinfer.router.baselines import make_router
from jaxinfer.router.cost_model import CostModel
from jaxinfer.router.sim import Simulator
from jaxinfer.router.trace import load_azure
from jaxinfer.sampling_params import SamplingParams
from profiling.step_profile import calibrate, host_drift, profile, rescaled
from tests.conftest import tiny_config
from tests.engine.tiny_engine import CharTokenizer

PAGE = 8
MAX_LEN = 256
# one step per device call: the simulator schedules step by step and does not model decode bursts,
# during which (and the burst chained after them) a new request waits to be admitted; with bursts its
# TTFT came out 25-35% short on a congested workload (an engine feature the simulator has yet to model)
SCHED = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN, max_prefill_seqs=8,
                        decode_buckets=(2, 8), prefill_buckets=(64,), kv_buckets=(64, MAX_LEN),
                        decode_kv_buckets=(64, MAX_LEN), mixed_kv_buckets=(MAX_LEN,), decode_steps=1)


def make_engines(count):
    # big enough that a step's device time, not Python, dominates it
    model = init_random(tiny_config(vocab_size=64, hidden_size=512, intermediate_size=2048, num_layers=6,
                                    num_heads=8, num_kv_heads=2, head_dim=64, max_position=MAX_LEN), seed=5)
    config = EngineConfig(cache=CacheConfig(page_size=PAGE, num_pages=256, enable_prefix_caching=False),
                          scheduler=SCHED)
    engines = [Engine(model, CharTokenizer(), config, mesh=mesh) for mesh in replica_meshes(count)[:count]]
    for engine in engines:
        engine.warm_up()
    return engines


def profiled(engines):
    """The engines' profiled step costs (CostModel JSON)."""
    return profile(engines, decode_batch=SCHED.decode_buckets, decode_kv=SCHED.decode_kv_buckets,
                   prefill_tokens=SCHED.prefill_buckets, prefill_kv=SCHED.kv_buckets, repeats=5)


def workload(count=20, seed=3):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.2, count))
    prompts = rng.integers(8, 120, count)
    outputs = rng.integers(8, 60, count)
    return [(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs, strict=True)]


def azure_slice(count=12, seed=3):
    """``count`` consecutive requests of the Azure conversation trace (from an offset set by the seed),
    lengths scaled by 1/12 to the tiny model's context (prompt <= 160, output <= 60) and arrivals
    re-timed to the same mean gap as ``workload``'s (1.2 s), keeping the trace's burstiness."""
    trace = load_azure(limit=2000)
    start = 200 * (seed - 2)
    rows = trace[start:start + count]
    gaps = np.diff([r.arrival for r in rows], prepend=rows[0].arrival)
    gaps = gaps * 1.2 / max(float(gaps[1:].mean()), 1e-9)
    return [(float(t), int(min(max(r.prompt_len // 12, 8), 160)), int(min(max(r.output_len // 12, 8), 60)))
            for t, r in zip(np.cumsum(gaps), rows, strict=True)]


def measure(engines, router, requests):
    cluster = Cluster(engines, router)

    async def one(start, index, arrival, prompt, output):
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        sent = time.perf_counter()
        stream = await cluster.add_request([3 + i % 50 for i in range(prompt)],
                                           SamplingParams(max_tokens=output, ignore_eos=True), f"w{index}")
        first = None
        async for out in stream:
            if first is None and out.new_token_ids:
                first = time.perf_counter()
        return first - sent, time.perf_counter() - sent

    async def run():
        start = time.perf_counter() + 0.05
        return await asyncio.gather(*(one(start, i, *r) for i, r in enumerate(requests)))
    try:
        results = asyncio.run(run())
    finally:
        cluster.shutdown()
    return float(np.mean([r[0] for r in results])), float(np.mean([r[1] for r in results]))


def trial(engines, measured, router, requests):
    """One real run of the workload and its simulation; returns (sim / real mean E2E, sim / real mean TTFT)."""
    for engine in engines:
        engine.step_log = []
    ttft, e2e = measure(engines, make_router(router, 2, CostModel.from_dict(measured), MAX_LEN), requests)
    # The step costs the simulator uses are fitted to this run's own step times (never its
    # latencies): the host model (cores a step keeps busy, host time around a step), then one factor
    # for decode and one for prefill steps. On a shared 2-core host the machine's speed wanders by
    # 10-40% between a profile and a later run, and other processes slow the two kinds of step by
    # different amounts (measured); fitted this way the comparison tests what the simulator adds,
    # its queueing, batching and routing, and not the host's noise.
    logs = [engine.step_log for engine in engines]
    fitted = calibrate(measured, logs)
    drift = host_drift(fitted, logs)
    cost_model = CostModel.from_dict(rescaled(fitted, *drift))
    sim = Simulator(make_router(router, 2, cost_model, MAX_LEN), cost_model, 2, requests).run().summary
    print(f"{router}: host {cost_model.extra.get('host')}, overhead {cost_model.extra['step_overhead_seconds']:.4f}, "
          f"drift {drift[0]:.3f} / {drift[1]:.3f}, real TTFT {ttft * 1e3:.1f} ms E2E {e2e * 1e3:.1f} ms | "
          f"sim TTFT {sim['mean_ttft'] * 1e3:.1f} ms E2E {sim['mean_e2e'] * 1e3:.1f} ms")
    return sim["mean_e2e"] / e2e, sim["mean_ttft"] / ttft


def within(e2e: float, ttft: float) -> bool:
    """The bounds the median ratios must meet: sim / real mean E2E within 15% of 1, mean TTFT within 20%."""
    return abs(e2e - 1) <= 0.15 and abs(ttft - 1) <= 0.20


@pytest.fixture(scope="module")
def engines_and_profile():
    engines = make_engines(2)
    return engines, profiled(engines)


@pytest.mark.parametrize("router, requests", [("least-loaded", workload), ("least-loaded", azure_slice)],
                         ids=["poisson", "azure-conv"])
def test_simulated_latency_matches_real_cluster(engines_and_profile, router, requests):
    engines, measured = engines_and_profile
    # Three trials of a 12-request workload, their median ratio: with one run a wandering host speed
    # (one drift factor per run cannot follow it) decided alone; here 9 trials gave sim / real E2E
    # 0.91-1.03 and TTFT 0.90-1.05 on the Poisson workload. When the first two are both within the
    # bounds the median of three is too, whatever the third gives: it is run only when it can decide.
    ratios = [trial(engines, measured, router, requests(count=12, seed=seed)) for seed in (3, 4)]
    if not all(within(*ratio) for ratio in ratios):
        ratios.append(trial(engines, measured, router, requests(count=12, seed=5)))
    e2e, ttft = np.median(np.array(ratios), axis=0)
    assert within(e2e, ttft), ratios
