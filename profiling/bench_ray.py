"""Replica groups as Ray actors against the same replicas in this process (``serve --cluster ray``
against ``serve --replicas N``): what Ray costs.

- Token stream overhead: one request at a time (greedy, the default model), client-side time to first
  token and time per output token, in-process replica vs Ray replica.
- Router time per decision (the serving process's share of each dispatch and rebalance).
- Migration: a running long request moved live between two replicas (in-process: device to
  device; Ray: node to node, KV pages pulled through the object store, and by
  jax.experimental.transfer): the pause as the migration counts it (from asking the source to stop
  the request, which waits for the decode burst in flight, to the destination's commit), the
  longest gap between two outputs the client saw against its median gap, the move's wall time and
  its throughput (KV bytes over wall time, control round trips included); plus each link's raw
  bandwidth as ``measure_links`` probes it at start.
- The Azure conversation trace slice on N replicas, in-process vs on N Ray nodes, same router
  (cascade), same requests: mean/P99 E2E, TTFT, TPOT, tokens/s, and whether the outputs are the
  same tokens.

The Ray side is a test cluster on this machine: a head without CPUs (the serving process) and N
worker nodes, each its own raylet and object store with one replica. Ray listens on every
interface, so the script runs itself inside a network namespace of its own (``unshare -n``: needs
root or user namespaces) with token authentication.

    JAXINFER_CACHE=/tmp/jicache PYTHONPATH=. python profiling/bench_ray.py [--replicas 4] [--requests 40]
        [--rate 0.4]

On this 2-core host every replica of either kind shares the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPLICAS_DEFAULT = 4
if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={REPLICAS_DEFAULT}")

import numpy as np  # noqa: E402

from jaxinfer.router.base import Router  # noqa: E402

LONG_PROMPT, LONG_OUTPUT = 1024, 192  # the migrated request
STREAM_PROMPT, STREAM_OUTPUT = 128, 64  # the stream-overhead request


def replica_engines(max_len: int, num_pages: int, meshes=(None,)) -> list:
    """Replica engines of the default model, one per mesh (in a Ray actor: one, built there)."""
    from jaxinfer.compile_cache import enable_compilation_cache
    from jaxinfer.engine.engine import Engine
    from jaxinfer.loader import DEFAULT_MODEL, load_model
    from profiling.bench_cluster import engine_config

    enable_compilation_cache()
    loaded = load_model(DEFAULT_MODEL, "float32")
    return [Engine(loaded.model, loaded.tokenizer, engine_config(max_len, num_pages), mesh=mesh) for mesh in meshes]


def ray_replica_engine(max_len: int, num_pages: int):
    return replica_engines(max_len, num_pages)[0]


class Fixed(Router):
    """Sends everything to ``replica`` and orders nothing (the single-request runs)."""

    name = "fixed"
    interval = 60.0

    def __init__(self, replica: int = 0):
        self.replica = replica

    def dispatch(self, request, replicas, now):
        return self.replica


async def stream_latency(cluster, repeats: int = 3) -> dict:
    """Client-side TTFT and time per output token of one request at a time on replica 0."""
    from jaxinfer.sampling_params import SamplingParams

    rng = np.random.default_rng(5)
    ttft, tpot = [], []
    for k in range(repeats):
        ids = rng.integers(1000, 20000, STREAM_PROMPT).tolist()
        sent = time.perf_counter()
        stream = await cluster.add_request(ids, SamplingParams(max_tokens=STREAM_OUTPUT, ignore_eos=True,
                                                               temperature=0.0), f"lat{k}")
        first, count = None, 0
        async for output in stream:
            if output.new_token_ids and first is None:
                first = time.perf_counter()
            count += len(output.new_token_ids)
        done = time.perf_counter()
        ttft.append(first - sent)
        tpot.append((done - first) / max(count - 1, 1))
    return {"ttft_ms": 1e3 * float(np.median(ttft)), "tpot_ms": 1e3 * float(np.median(tpot))}


async def migration_runs(cluster, pairs, page_bytes: int) -> list[dict]:
    """A long request started on each pair's source, moved live to its destination after 8 tokens."""
    from jaxinfer.router.base import Migration
    from jaxinfer.sampling_params import SamplingParams

    rng = np.random.default_rng(6)
    runs = []
    for k, (src, dst) in enumerate(pairs):
        cluster.router.replica = src
        before = dict(cluster.stats.as_dict())
        ids = rng.integers(1000, 20000, LONG_PROMPT).tolist()
        request_id = f"mig{k}"
        stream = await cluster.add_request(ids, SamplingParams(max_tokens=LONG_OUTPUT, ignore_eos=True,
                                                               temperature=0.0), request_id)
        task, count, arrivals = None, 0, []
        async for output in stream:
            count += len(output.new_token_ids)
            arrivals.append(time.perf_counter())
            if task is None and count >= 8:
                task = asyncio.ensure_future(timed_move(cluster, Migration(request_id, src, dst, "bench")))
        moved, seconds = await task
        gaps = np.diff(arrivals[1:])  # between outputs (a burst's tokens come together)
        after = cluster.stats.as_dict()
        pages = after["pages_copied"] - before["pages_copied"]
        runs.append({"src": src, "dst": dst, "moved": moved, "pages": pages, "move_seconds": seconds,
                     "pause_ms": 1e3 * (after["pause_seconds"] - before["pause_seconds"]),
                     "max_gap_ms": 1e3 * float(gaps.max()), "median_gap_ms": 1e3 * float(np.median(gaps)),
                     "mb_per_second": pages * page_bytes / seconds / 1e6})
    return runs


async def timed_move(cluster, order) -> tuple[bool, float]:
    started = time.perf_counter()
    moved = await cluster.migrate(order)
    return moved, time.perf_counter() - started


async def trace_run(cluster, requests) -> dict:
    from profiling.bench_cluster import serve, summary

    served = await serve(cluster, requests)
    state = cluster.describe()
    out = summary(served["records"], served["wall"], state["migrations"]["completed"], state["router_ms_per_decision"])
    out["migrations"] = state["migrations"]
    stages = state["router"]["stages"]
    out["plan"] = {"stages": [(stage["lo"], stage["hi"], len(stage["replicas"])) for stage in stages],
                   "within_stage": state["router"]["within_stage"]}
    out["tokens"] = [r["tokens"] for r in served["records"]]
    return out


async def measure(cluster_of, replicas: int, max_len: int, cost_model, page_bytes: int, requests) -> dict:
    """The measurements on one kind of replica; ``cluster_of(router)`` gives a Cluster over them."""
    from jaxinfer.router.baselines import make_router

    result = {}
    fixed = cluster_of(Fixed())
    result["stream"] = await stream_latency(fixed)
    pairs = [(i, (i + 1) % replicas) for i in range(min(replicas, 3))]
    result["migration"] = await migration_runs(fixed, pairs, page_bytes)
    if hasattr(fixed.replicas[0], "transport"):  # Ray replicas: the device-to-device transport too
        for replica in fixed.replicas:
            replica.transport = "jax"
        result["migration_jax"] = await migration_runs(fixed, pairs, page_bytes)
        for replica in fixed.replicas:
            replica.transport = "host"
    sample = [(a, len(ids), out) for a, ids, out in requests]
    window = max(a for a, _, _ in requests) or 1.0
    router = make_router("cascade", replicas, cost_model, max_len, sample=sample, sample_window_seconds=window,
                         background=True)
    result["trace"] = await trace_run(cluster_of(router), requests)
    return result


def clusters_over(replicas, cost_model, local: bool, **kw):
    """``cluster_of(router)``: a Cluster over ``replicas`` with ``router``; the one before it retires
    (engines in this process: its loop threads stop, the engines stay; Ray replicas: its router loop
    stops, the actors stay). ``cluster_of.last``: the latest."""
    from jaxinfer.replicas.cluster import Cluster

    def cluster_of(router):
        last = cluster_of.last
        if last is not None and local:
            last.shutdown()
        elif last is not None:
            if last._task is not None:
                last._task.cancel()
            last.router.close()
        cluster_of.last = Cluster(replicas, router, migration="live", cost_model=cost_model, **kw)
        return cluster_of.last
    cluster_of.last = None
    return cluster_of


def in_process(args, requests) -> tuple[dict, int]:
    import jax

    from jaxinfer.replicas.placement import replica_meshes

    engines = replica_engines(args.max_len, args.num_pages,
                              replica_meshes(args.replicas, jax.local_devices()[:args.replicas]))
    start = time.perf_counter()
    for engine in engines:
        engine.warm_up(migration=True)
    print(f"in-process warm-up: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    cost_model = shipped_cost_model(args.num_pages * engines[0].block_manager.page_size)
    page_bytes = engines[0].bytes_per_page
    cluster_of = clusters_over(engines, cost_model, local=True)
    result = asyncio.run(measure(cluster_of, args.replicas, args.max_len, cost_model, page_bytes, requests))
    cluster_of.last.shutdown()
    return result, page_bytes


def shipped_cost_model(capacity_tokens: int):
    from jaxinfer.router.cost_model import CostModel
    from jaxinfer.serve.server import SHIPPED_COST_MODEL

    return CostModel.load(SHIPPED_COST_MODEL).with_capacity(capacity_tokens)


def on_ray(args, requests, page_bytes: int) -> dict:
    token_dir = tempfile.mkdtemp(prefix="ji-bench-ray-")
    token = Path(token_dir, "token")
    token.write_text(secrets.token_hex(32))
    os.makedirs(os.path.join(token_dir, "ray"))  # Ray's files, its address file included, stay in this folder
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=token_dir)
    import ray
    from ray.cluster_utils import Cluster as RayCluster

    from jaxinfer.replicas.ray_replica import measure_links, start_replicas

    head = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 256 << 20, "temp_dir": os.path.join(token_dir, "ray")})
    try:
        for i in range(args.replicas):
            head.add_node(num_cpus=1, resources={f"host{i}": 1}, object_store_memory=256 << 20)
        env = {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        if os.environ.get("JAXINFER_CACHE"):
            env["JAXINFER_CACHE"] = os.environ["JAXINFER_CACHE"]
        ray.init(address=head.address, runtime_env={"env_vars": env})
        start = time.perf_counter()
        replicas = start_replicas(functools.partial(ray_replica_engine, args.max_len, args.num_pages), args.replicas,
                                  options=[{"num_cpus": 1, "resources": {f"host{i}": 1}} for i in range(args.replicas)])
        up = time.perf_counter() - start
        print(f"Ray replicas up (model loaded and warmed up in each actor): {up:.0f} s", file=sys.stderr)
        start = time.perf_counter()
        links = measure_links(replicas)
        probe = time.perf_counter() - start
        cost_model = shipped_cost_model(args.num_pages * replicas[0].page_size)
        cluster_of = clusters_over(replicas, cost_model, local=False, links=links)
        result = asyncio.run(measure(cluster_of, args.replicas, args.max_len, cost_model, page_bytes, requests))
        result["links_mb_per_second"] = {f"{s}->{d}": v / 1e6 for (s, d), v in sorted(links.items())}
        result["link_probe_seconds"] = probe
        result["startup_seconds"] = up
        for replica in replicas:
            replica.shutdown(timeout=10)
        return result
    finally:
        ray.shutdown()
        head.shutdown()
        shutil.rmtree(token_dir, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=REPLICAS_DEFAULT)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=0.4, help="mean arrivals per second of the trace slice")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--length-scale", type=int, default=4, help="trace lengths are divided by this")
    parser.add_argument("--num-pages", type=int, default=512, help="KV pages per replica")
    parser.add_argument("--out", type=Path, default=REPO / "profiling" / "results" / "ray.json")
    args = parser.parse_args(argv)
    if os.environ.get("JAXINFER_NETNS") != "1":  # Ray must not listen on this host's interfaces
        command = f"ip link set lo up && JAXINFER_NETNS=1 exec {sys.executable} {' '.join(sys.argv)}"
        sys.exit(subprocess.run(["unshare", "-n", "sh", "-c", command]).returncode)

    from profiling.bench_cluster import workload

    requests = workload(args.requests, args.rate, args.max_len, args.length_scale)
    local, page_bytes = in_process(args, requests)
    remote = on_ray(args, requests, page_bytes)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": datetime.date.today().isoformat(), "replicas": args.replicas, "requests": args.requests,
              "rate": args.rate, "page_bytes": page_bytes, "in_process": local, "ray": remote,
              "outputs_equal": local["trace"]["tokens"] == remote["trace"]["tokens"]}
    for side in (local, remote):
        side["trace"].pop("tokens")

    print(f"{'':<34} {'in-process':>12} {'Ray':>12}")
    rows = [("stream: TTFT (ms)", lambda r: r["stream"]["ttft_ms"]),
            ("stream: time per output token (ms)", lambda r: r["stream"]["tpot_ms"]),
            ("migration: pause (ms, median)", lambda r: float(np.median([m["pause_ms"] for m in r["migration"]]))),
            ("migration: client's longest gap (ms)",
             lambda r: float(np.median([m["max_gap_ms"] for m in r["migration"]]))),
            ("migration: client's median gap (ms)",
             lambda r: float(np.median([m["median_gap_ms"] for m in r["migration"]]))),
            ("migration: wall (s, median)", lambda r: float(np.median([m["move_seconds"] for m in r["migration"]]))),
            ("migration: MB/s (median)", lambda r: float(np.median([m["mb_per_second"] for m in r["migration"]]))),
            ("trace: mean E2E (s)", lambda r: r["trace"]["mean_e2e"]),
            ("trace: P99 E2E (s)", lambda r: r["trace"]["p99_e2e"]),
            ("trace: mean TTFT (s)", lambda r: r["trace"]["mean_ttft"]),
            ("trace: mean TPOT (ms)", lambda r: 1e3 * r["trace"]["mean_tpot"]),
            ("trace: output tokens/s", lambda r: r["trace"]["tokens_per_second"]),
            ("trace: migrations per request", lambda r: r["trace"]["migrations_per_request"]),
            ("router ms per decision", lambda r: r["trace"]["router_ms_per_decision"])]
    for name, value in rows:
        print(f"{name:<34} {value(local):12.3f} {value(remote):12.3f}")
    jax_moves = remote["migration_jax"]
    print(f"{'migration over jax.experimental.transfer':<34} {'':>12} pause "
          f"{np.median([m['pause_ms'] for m in jax_moves]):.1f} ms, longest gap "
          f"{np.median([m['max_gap_ms'] for m in jax_moves]):.0f} ms, "
          f"{np.median([m['mb_per_second'] for m in jax_moves]):.0f} MB/s")
    print(f"cascade plan: in-process {local['trace']['plan']}, Ray {remote['trace']['plan']}")
    links = remote["links_mb_per_second"].values()
    print(f"links (object store pull, 32 MiB): {min(links):.0f}-{max(links):.0f} MB/s; "
          f"outputs equal: {result['outputs_equal']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
