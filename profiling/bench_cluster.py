"""Replica groups on this machine: the same Azure trace slice served by N CPU replicas (virtual XLA
devices) under each router, measured on the real engines, then the simulator's prediction of the
same runs from the cost model profiled here.

For every arrival rate and router it reports mean and P99 E2E latency, mean TTFT and TPOT, output
tokens/s, migrations per request and router time per decision; it checks that every router's
outputs are the same tokens (greedy), and it compares the simulator's mean TTFT and E2E with the
measured ones (the simulator validation). Writes JSON as it goes.

    JAXINFER_CACHE=/tmp/jicache PYTHONPATH=. python profiling/bench_cluster.py \
        [--replicas 4] [--requests 40] [--rates 0.4,0.8] [--routers cascade,round-robin,least-loaded,llumnix]

On CPU the replicas share the host's cores: while k replicas run a step at once, each step takes
longer than the profile says. The profile measures how many cores a decode and a prefill step keep
busy, and the simulator stretches steps accordingly (``CostModel.host_slowdown``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPLICAS_DEFAULT = 4
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={REPLICAS_DEFAULT}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.compile_cache import enable_compilation_cache  # noqa: E402
from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from jaxinfer.engine.batch import all_step_shapes  # noqa: E402
from jaxinfer.engine.engine import Engine  # noqa: E402
from jaxinfer.loader import DEFAULT_MODEL, load_model  # noqa: E402
from jaxinfer.replicas.cluster import Cluster  # noqa: E402
from jaxinfer.replicas.placement import replica_meshes  # noqa: E402
from jaxinfer.router.baselines import make_router  # noqa: E402
from jaxinfer.router.cost_model import CostModel  # noqa: E402
from jaxinfer.router.sim import Simulator  # noqa: E402
from jaxinfer.router.trace import load_azure  # noqa: E402
from jaxinfer.sampling_params import SamplingParams  # noqa: E402
from profiling.step_profile import calibrate, profile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAGE_SIZE = 16


def engine_config(max_len: int, num_pages: int) -> EngineConfig:
    scheduler = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=max_len,
                                decode_buckets=(4, 16), prefill_buckets=(256,), kv_buckets=(512, max_len),
                                decode_kv_buckets=(512, max_len), mixed_kv_buckets=(max_len,))
    return EngineConfig(cache=CacheConfig(page_size=PAGE_SIZE, num_pages=num_pages, enable_prefix_caching=False),
                        scheduler=scheduler)


def workload(count: int, rate: float, max_len: int, scale: int, seed: int = 0, offset: int = 0):
    """``count`` requests of the trace from its ``offset``-th, lengths divided by ``scale`` (prompt +
    output fits max_len), arrivals rescaled to ``rate`` requests/s on average; prompts are seeded random
    token ids."""
    rows = load_azure(limit=offset + count)[offset:]
    span = rows[-1].arrival - rows[0].arrival or 1.0
    stretch = (count - 1) / rate / span
    rng = np.random.default_rng(seed)
    requests = []
    for r in rows:
        output = max(r.output_len // scale, 4)
        prompt = min(max(r.prompt_len // scale, 4), max_len - output - 1)
        ids = rng.integers(1000, 20000, prompt).tolist()
        requests.append(((r.arrival - rows[0].arrival) * stretch, ids, output))
    return requests


def profile_engines(engines: list[Engine], calibration) -> CostModel:
    """The cost model of the engines' own step shapes, with the host model (how the CPU replicas share
    the cores, the host time around a step) fitted to a run of the ``calibration`` workload (other
    requests of the trace than the measured ones)."""
    config = engines[0].scheduler_config
    measured = profile(engines, decode_batch=config.decode_buckets, decode_kv=config.decode_kv_buckets,
                       prefill_tokens=config.prefill_buckets, prefill_kv=config.kv_buckets, model=DEFAULT_MODEL)
    for engine in engines:
        engine.step_log = []
    cluster = Cluster(engines, make_router("round-robin", len(engines), CostModel.from_dict(measured),
                                           config.max_model_len))
    asyncio.run(serve(cluster, calibration))
    cluster.shutdown()
    fitted = calibrate(measured, [engine.step_log for engine in engines])
    for engine in engines:
        engine.step_log = None
    return CostModel.from_dict(fitted)


async def serve(cluster: Cluster, requests) -> dict:
    start = time.perf_counter()
    records = [None] * len(requests)

    async def one(index, arrival, ids, output):
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        sent = time.perf_counter()
        stream = await cluster.add_request(ids, SamplingParams(max_tokens=output, ignore_eos=True, temperature=0.0),
                                           f"q{index}")
        first, tokens = None, []
        async for out in stream:
            if out.new_token_ids and first is None:
                first = time.perf_counter()
            tokens += out.new_token_ids
        done = time.perf_counter()
        records[index] = {"ttft": first - sent, "e2e": done - sent,
                          "tpot": (done - first) / max(len(tokens) - 1, 1), "tokens": tokens}
    await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))
    wall = time.perf_counter() - start
    return {"records": records, "wall": wall}


def summary(records, wall, migrations, decisions_ms) -> dict:
    e2e = np.array([r["e2e"] for r in records])
    tokens = sum(len(r["tokens"]) for r in records)
    return {"mean_e2e": float(e2e.mean()), "p99_e2e": float(np.percentile(e2e, 99)),
            "mean_ttft": float(np.mean([r["ttft"] for r in records])),
            "mean_tpot": float(np.mean([r["tpot"] for r in records])), "tokens_per_second": tokens / wall,
            "migrations_per_request": migrations / len(records), "router_ms_per_decision": decisions_ms}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=REPLICAS_DEFAULT)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rates", default="0.4,0.8", help="mean arrivals per second, comma-separated")
    parser.add_argument("--routers", default="cascade,round-robin,least-loaded,llumnix")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--length-scale", type=int, default=4, help="trace lengths are divided by this")
    parser.add_argument("--num-pages", type=int, default=512, help="KV pages per replica")
    parser.add_argument("--out", type=Path, default=REPO / "profiling" / "results" / "cluster.json")
    args = parser.parse_args(argv)

    enable_compilation_cache()
    loaded = load_model(DEFAULT_MODEL, "float32")
    config = engine_config(args.max_len, args.num_pages)
    meshes = replica_meshes(args.replicas, jax.local_devices()[:args.replicas])
    engines = [Engine(loaded.model, loaded.tokenizer, config, mesh=mesh) for mesh in meshes]
    start = time.perf_counter()
    for engine in engines:
        engine.warm_up(migration=True)
    print(f"warm-up of {args.replicas} replicas: {time.perf_counter() - start:.0f} s "
          f"({len(all_step_shapes(engines[0].scheduler_config))} step shapes each)", file=sys.stderr)
    rates = [float(r) for r in args.rates.split(",")]
    cost_model = profile_engines(engines, workload(args.requests // 2, rates[0], args.max_len, args.length_scale,
                                                   seed=1, offset=args.requests))
    cost_model.save(args.out.with_name("cost_model_cluster.json"))
    print(f"host model: {cost_model.extra.get('host')}", file=sys.stderr)

    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": datetime.date.today().isoformat(), "replicas": args.replicas, "requests": args.requests,
              "length_scale": args.length_scale, "max_len": args.max_len, "host": cost_model.extra.get("host"),
              "engine": {"max_num_seqs": 16, "decode_buckets": [4, 16], "decode_kv_buckets": [512, args.max_len],
                         "num_pages": args.num_pages, "page_size": PAGE_SIZE}, "runs": []}
    header = (f"{'rate':>5} {'router':<13} {'mean E2E':>9} {'P99 E2E':>9} {'TTFT':>7} {'TPOT':>7} {'tok/s':>6} "
              f"{'mig/req':>7} {'sim E2E':>8} {'sim TTFT':>8}")
    print(header)
    reference_tokens = None
    for rate in rates:
        requests = workload(args.requests, rate, args.max_len, args.length_scale)
        for name in args.routers.split(","):
            sample = [(a, len(ids), out) for a, ids, out in requests]
            window = max(a for a, _, _ in requests) or 1.0
            kw = dict(sample=sample, sample_window_seconds=window) if name == "cascade" else {}
            router = make_router(name, args.replicas, cost_model, args.max_len, **kw)
            cluster = Cluster(engines, router, cost_model=cost_model)
            served = asyncio.run(serve(cluster, requests))
            cluster.shutdown()
            stats = cluster.describe()
            real = summary(served["records"], served["wall"], stats["migrations"]["completed"],
                           stats["router_ms_per_decision"])
            tokens = [r["tokens"] for r in served["records"]]
            reference_tokens = reference_tokens or {}
            same = reference_tokens.setdefault(rate, tokens) == tokens
            sim_router = make_router(name, args.replicas, cost_model, args.max_len, **kw)
            sim = Simulator(sim_router, cost_model, args.replicas, [(a, len(ids), out) for a, ids, out in requests],
                            migration="live").run().summary
            run = {"rate": rate, "router": name, "real": real, "sim": {k: sim[k] for k in (
                "mean_e2e", "p99_e2e", "mean_ttft", "mean_tpot") if k in sim}, "outputs_equal_first_router": same,
                "plan": stats["router"].get("stages"), "migrations": stats["migrations"]}
            run["sim_error"] = {k: (run["sim"][k] - real[k]) / real[k] for k in ("mean_e2e", "mean_ttft")
                                if k in run["sim"]}
            result["runs"].append(run)
            print(f"{rate:5.2f} {name:<13} {real['mean_e2e']:9.2f} {real['p99_e2e']:9.2f} {real['mean_ttft']:7.2f} "
                  f"{real['mean_tpot'] * 1e3:6.0f}m {real['tokens_per_second']:6.1f} "
                  f"{real['migrations_per_request']:7.2f} {run['sim'].get('mean_e2e', 0):8.2f} "
                  f"{run['sim'].get('mean_ttft', 0):8.2f}{'' if same else '  OUTPUTS DIFFER'}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
