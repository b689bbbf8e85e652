"""A Ray test cluster behind one jaxinfer Cluster, run by test_ray_cluster.py inside a network namespace
of its own (``unshare -n``: Ray listens on every interface and advertises a routable address, so
its traffic must not be able to leave loopback). Head (no CPUs, the serving process) plus three
worker nodes, each with its own raylet and object store and one tiny-model replica pinned to it.
Prints one JSON line: what each scenario produced, and what the reference engine produced.

    unshare -n sh -c 'ip link set lo up && python tests/replicas/ray_driver.py'
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

NODES = 3
PROMPTS = ["thequickbrownfoxjumps", "overthelazydog", "pack", "myboxwithfivedozenliquorjugs", "sphinx",
           "ofblackquartzjudgemyvow"]


def replica_engine():
    """Built inside each actor's process (pickled by reference: the workers import this module)."""
    from jaxinfer.engine.compile_plan import CompilePlan
    from tests.engine.test_migration import make_engine

    engine = make_engine(None)
    engine.runner.warm_up(CompilePlan(page_buckets=engine.runner.page_buckets()))  # the page transfers
    return engine


async def scenarios(replicas, expected, params_of) -> dict:
    from jaxinfer.replicas.cluster import Cluster
    from jaxinfer.router.base import Migration
    from jaxinfer.router.baselines import RoundRobinRouter
    from tests.engine.test_migration import PROMPT, ToReplica
    from tests.engine.tiny_engine import CharTokenizer

    out = {}
    tokenizer = CharTokenizer()

    # every prompt at once, round-robin over the three nodes
    cluster = Cluster(replicas, RoundRobinRouter())

    async def one(index, prompt):
        stream = await cluster.add_request(tokenizer.encode(prompt), params_of("serving"), f"s{index}")
        tokens = []
        async for output in stream:
            tokens += output.new_token_ids
        return tokens
    start = time.perf_counter()
    out["serving"] = {"tokens": await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))),
                      "seconds": time.perf_counter() - start}

    # a request moved from node 1's replica to node 2's while it streams
    for name, mode, kind in (("live", "live", "greedy"), ("live_penalties", "live", "penalties"),
                             ("recompute", "recompute", "greedy")):
        cluster = Cluster(replicas, ToReplica(0), migration=mode, last_round_pages=1)
        stream = await cluster.add_request(tokenizer.encode(PROMPT), params_of(kind), f"m-{name}")
        tokens, task = [], None
        async for output in stream:
            tokens += output.new_token_ids
            if task is None and len(tokens) >= 12:
                task = asyncio.ensure_future(cluster.migrate(Migration(f"m-{name}", 0, 1, "test")))
        moved = await task
        out[name] = {"tokens": tokens, "moved": moved, "stats": cluster.stats.as_dict()}

    import ray
    out["pools"] = ray.get([r.actor.pool.remote() for r in replicas])
    out["nodes"] = [r.facts["node_id"] for r in replicas]
    out["expected"] = expected
    return out


def main() -> None:
    token_dir = tempfile.mkdtemp(prefix="ji-ray-")
    token = Path(token_dir, "token")
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    import ray
    from ray.cluster_utils import Cluster as RayCluster

    from jaxinfer.replicas.ray_replica import start_replicas
    from jaxinfer.sampling_params import SamplingParams
    from tests.engine.test_migration import PROMPT
    from tests.engine.tiny_engine import CharTokenizer

    def params_of(kind):
        extra = dict(temperature=0.8, seed=7, repetition_penalty=1.3, frequency_penalty=0.2) \
            if kind == "penalties" else dict(temperature=0.0)
        return SamplingParams(max_tokens=70 if kind != "serving" else 30, ignore_eos=True, **extra)

    tokenizer = CharTokenizer()
    started = time.perf_counter()
    cluster = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 80 * 2**20, "temp_dir": os.path.join(token_dir, "ray")})
    try:
        for i in range(NODES):
            cluster.add_node(num_cpus=1, resources={f"host{i}": 1}, object_store_memory=80 * 2**20)
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                                                    "JAX_PLATFORMS": "cpu"}})
        replicas = start_replicas(replica_engine, NODES, warm_up=False,
                                  options=[{"num_cpus": 1, "resources": {f"host{i}": 1}} for i in range(NODES)])
        up = time.perf_counter() - started
        reference = replica_engine()
        expected = {
            "serving": [o.output_ids for o in reference.generate([tokenizer.encode(p) for p in PROMPTS],
                                                                  params_of("serving"))],
            "greedy": reference.generate([tokenizer.encode(PROMPT)], params_of("greedy"))[0].output_ids,
            "penalties": reference.generate([tokenizer.encode(PROMPT)], params_of("penalties"))[0].output_ids}
        result = asyncio.run(scenarios(replicas, expected, params_of))
        result["startup_seconds"] = up
        for replica in replicas:
            replica.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(token_dir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
