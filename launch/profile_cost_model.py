"""Profile one replica's step time on this machine and save the cost model the CascadeInfer router
and the simulator use (jaxinfer.router.cost_model.CostModel): the time of a decode step by (rows,
KV length every row is padded to), of a prefill step by (prompt tokens, KV extent), and the
device-to-device bandwidth of a KV page migration between two replica groups.

    JAXINFER_CACHE=/tmp/jicache PYTHONPATH=. python launch/profile_cost_model.py \
        --out profiling/results/cost_model.json

Each shape is compiled once and timed over --repeats runs (median). The step shapes are the
engine's own: a step's cost depends on its padded shape, which is why a batch that mixes a short and
a long context pays the long one for every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.compile_cache import enable_compilation_cache  # noqa: E402
from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from jaxinfer.engine.batch import StepShape  # noqa: E402
from jaxinfer.engine.engine import Engine  # noqa: E402
from jaxinfer.engine.placement import replica_meshes  # noqa: E402
from jaxinfer.engine.scheduler import SchedulerOutput  # noqa: E402
from jaxinfer.loader import DEFAULT_MODEL, load_model  # noqa: E402


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def timed(function, repeats: int) -> float:
    function()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def step_seconds(engine: Engine, shape: StepShape, repeats: int) -> float:
    runner = engine.runner
    forward, sampler = runner._executable(shape)
    batch = runner.builder.build(SchedulerOutput([], [], []), shape, impl=runner.impl, interpret=runner.interpret)

    def run():
        logits, runner.kv, runner.sampler = forward(runner.state, runner.kv, runner.sampler, batch)
        results, runner.sampler = sampler(logits, runner.sampler, batch.sample)
        jax.block_until_ready(results)
    return timed(run, repeats)


def copy_bandwidth(engines: list[Engine], pages: int, repeats: int) -> float:
    """Bytes/s of export (gather) + device-to-device copy + import (scatter) of ``pages`` pages."""
    src, dst = engines[0].runner, engines[1].runner
    ids = list(range(pages))

    def run():
        payload = src.export_pages(ids, dst.kv_sharding)
        dst.import_pages(ids, payload)
        jax.block_until_ready(dst.kv.k)
    seconds = timed(run, repeats)
    return pages * engines[0].bytes_per_page / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=ints, default=(1, 2, 4, 8, 16, 32))
    parser.add_argument("--kv", type=ints, default=(256, 512, 1024, 2048, 4096, 8192))
    parser.add_argument("--prefill-tokens", type=ints, default=(64, 128, 256))
    parser.add_argument("--prefill-kv", type=ints, default=(256, 1024, 4096, 8192))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=1024, help="KV pool of each profiled replica")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("profiling/results/cost_model.json"))
    args = parser.parse_args(argv)

    enable_compilation_cache()
    loaded = load_model(args.model, args.dtype)
    max_len = max(args.kv[-1], args.prefill_kv[-1])
    scheduler = SchedulerConfig(max_num_seqs=args.batch[-1], max_num_batched_tokens=args.prefill_tokens[-1],
                                max_model_len=max_len, decode_buckets=args.batch, prefill_buckets=args.prefill_tokens,
                                kv_buckets=args.prefill_kv, decode_kv_buckets=args.kv)
    config = EngineConfig(cache=CacheConfig(page_size=args.page_size, num_pages=args.num_pages),
                          scheduler=scheduler)
    meshes = replica_meshes(2, jax.local_devices()[:2]) if len(jax.local_devices()) >= 2 else [None]
    engines = [Engine(loaded.model, loaded.tokenizer, config, mesh=mesh) for mesh in meshes]
    engine = engines[0]

    decode = np.zeros((len(args.batch), len(args.kv)))
    for i, rows in enumerate(args.batch):
        for j, kv in enumerate(args.kv):
            decode[i, j] = step_seconds(engine, StepShape(rows, kv, 0, 0), args.repeats)
            print(f"decode rows {rows:3d} kv {kv:5d}: {1e3 * decode[i, j]:8.1f} ms", file=sys.stderr, flush=True)
    prefill = np.zeros((len(args.prefill_tokens), len(args.prefill_kv)))
    for i, tokens in enumerate(args.prefill_tokens):
        for j, kv in enumerate(args.prefill_kv):
            prefill[i, j] = step_seconds(engine, StepShape(0, 0, tokens, kv), args.repeats)
            print(f"prefill tokens {tokens:4d} kv {kv:5d}: {1e3 * prefill[i, j]:8.1f} ms", file=sys.stderr,
                  flush=True)
    bandwidth = 0.0
    if len(engines) > 1:
        bandwidth = copy_bandwidth(engines, min(64, args.num_pages), args.repeats)
        print(f"KV copy between replicas: {bandwidth / 1e9:.2f} GB/s", file=sys.stderr)

    kv_bytes_per_token = engine.bytes_per_page // args.page_size
    profile = {
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{jax.devices()[0].platform}",
        "model": args.model, "dtype": args.dtype, "date": datetime.date.today().isoformat(),
        "page_size": args.page_size, "kv_bytes_per_token": kv_bytes_per_token,
        "kv_capacity_tokens": args.num_pages * args.page_size,
        "max_num_seqs": args.batch[-1], "max_num_batched_tokens": args.prefill_tokens[-1],
        "decode": {"batch": list(args.batch), "kv_len": list(args.kv), "seconds": decode.round(6).tolist()},
        "prefill": {"tokens": list(args.prefill_tokens), "kv_len": list(args.prefill_kv),
                    "seconds": prefill.round(6).tolist()},
        "copy_bytes_per_second": bandwidth or 1e9,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
