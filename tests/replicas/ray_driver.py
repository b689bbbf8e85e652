"""A Ray test cluster behind one jaxinfer Cluster, run by test_ray_cluster.py inside a network namespace
of its own (``unshare -n``: Ray listens on every interface and advertises a routable address, so
its traffic must not be able to leave loopback). Head (no CPUs, the serving process) plus three
worker nodes, each with its own raylet and object store and one tiny-model replica pinned to it.
Prints one JSON line: what each scenario produced, and what the reference engine produced.

    unshare -n sh -c 'ip link set lo up && python tests/replicas/ray_driver.py'
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
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

    # no prefix caching: a resumed request would reuse pages whose KV an earlier request computed in
    # other step shapes, and seeded sampling at a near tie can then flip (not what this test is about)
    engine = make_engine(None, prefix_caching=False)
    engine.runner.warm_up(CompilePlan(page_buckets=engine.runner.page_buckets()))  # the page transfers
    return engine


async def scenarios(replicas, expected, params_of, ray_cluster, nodes) -> dict:
    from jaxinfer.replicas.cluster import Cluster
    from jaxinfer.router.base import Migration
    from jaxinfer.router.baselines import RoundRobinRouter
    from jaxinfer.serve.grpc_api import router_stats
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

    # a request moved from node 1's replica to node 2's while it streams; the tiny model can finish a request
    # before a move's round trips do (the move then reports it gone): a new request is tried then, up to 5
    for name, mode, kind in (("live", "live", "greedy"), ("live_penalties", "live", "penalties"),
                             ("live_jax", "live", "greedy"), ("live_jax_penalties", "live", "penalties"),
                             ("recompute", "recompute", "greedy")):
        replicas[1].transport = "jax" if "jax" in name else "host"  # jax.experimental.transfer, device to device
        attempts = []
        for attempt in range(5):
            cluster = Cluster(replicas, ToReplica(0), migration=mode, last_round_pages=1)
            request_id = f"m-{name}-{attempt}"
            stream = await cluster.add_request(tokenizer.encode(PROMPT), params_of(kind), request_id)
            tokens, task = [], None
            async for output in stream:
                tokens += output.new_token_ids
                if task is None and len(tokens) >= 4:
                    task = asyncio.ensure_future(cluster.migrate(Migration(request_id, 0, 1, "test")))
            moved = await task
            attempts.append({"tokens": tokens, "moved": moved, "stats": cluster.stats.as_dict()})
            if moved:
                break
        out[name] = {**attempts[-1], "attempts": attempts}
    replicas[1].transport = "host"

    import ray
    out["pools"] = ray.get([r.actor.pool.remote() for r in replicas])
    out["nodes"] = [r.facts["node_id"] for r in replicas]

    # an actor killed at each step of a live move (Ray restarts it and its replica rejoins): the request
    # finishes with the reference tokens wherever it ends up
    steps = {"after_reserve": ("dst", "reserve"), "mid_precopy": ("dst", "receive"),
             "after_detach": ("src", "detach_request"), "after_commit": ("dst", "commit_request")}
    faults = [("after_reserve", "dst"), ("mid_precopy", "src"), ("mid_precopy", "dst"), ("after_detach", "src"),
              ("after_detach", "dst"), ("after_commit", "src"), ("after_commit", "dst")]
    out["faults"] = {}
    for step, victim in faults:
        side, method = steps[step]
        src, dst = 0, 1
        hooked = replicas[src if side == "src" else dst]
        doomed = replicas[src if victim == "src" else dst]
        attempts = []
        for attempt in range(4):  # the tiny model can finish a request before the move reaches the step
            rejoins, fired = doomed.rejoins, []
            # a detach that found the request gone (it finished first) is no step of a move: no kill
            after(hooked, method, lambda doomed=doomed, fired=fired: fired.append(time.perf_counter()) or
                  kill_and_wait(doomed), when=(lambda result: result is not None) if method == "detach_request"
                  else None)
            cluster = Cluster(replicas, ToReplica(src), migration="live", last_round_pages=1, step_timeout=10)
            result = await one_move(cluster, tokenizer, params_of("greedy"), f"f-{step}-{victim}-{attempt}", src, dst)
            hooked.__dict__.pop(method, None)
            finished = time.perf_counter()
            while fired and doomed.rejoins == rejoins and time.perf_counter() - finished < 120:
                await asyncio.sleep(0.2)
            attempts.append({**result, "fired": bool(fired), "rejoined": doomed.rejoins > rejoins,
                             "failover": dict(cluster.failover),
                             "seconds": [finished - fired[0], time.perf_counter() - finished] if fired else None})
            # a request that finished on the victim before the kill reached its process is no loss to resume
            # (the tiny model streams fast): tried again, like a step the move never reached
            finished_first = (step, victim) in (("mid_precopy", "src"), ("after_commit", "dst")) and \
                cluster.failover["requests_resumed"] == 0
            if fired and not finished_first:
                break
        out["faults"][f"{step}:{victim}"] = {**attempts[-1], "attempts": attempts}
    out["pools_after_faults"] = ray.get([r.actor.pool.remote() for r in replicas])

    # deadlines: a commit whose reply never comes (it ran: the move stands) and an export that never
    # answers (the move is called off, the request stays at its source)
    out["deadlines"] = {}
    for name, side, method in (("commit_reply_lost", 1, "commit_request"), ("export_hangs", 0, "export")):
        hooked = replicas[side]
        original = getattr(hooked, method)

        async def stalled(*args, original=original):
            call = asyncio.ensure_future(original(*args))  # sent now, whatever the caller does ...
            await asyncio.sleep(3600)  # ... but its reply never comes back
            return await call
        hooked.__dict__[method] = stalled
        cluster = Cluster(replicas, ToReplica(0), migration="live", last_round_pages=1, step_timeout=2)
        result = await one_move(cluster, tokenizer, params_of("greedy"), f"d-{name}", 0, 1)
        hooked.__dict__.pop(method, None)
        out["deadlines"][name] = result
    await asyncio.sleep(0.5)
    out["pools_after_deadlines"] = ray.get([r.actor.pool.remote() for r in replicas])

    # the replicas that rejoined serve exactly again
    cluster = Cluster(replicas, ToReplica(0))
    out["rejoined_serving"] = []
    for index in (0, 1):
        cluster.router.replica = index
        stream = await cluster.add_request(tokenizer.encode(PROMPT), params_of("greedy"), f"back-{index}")
        out["rejoined_serving"].append([t for o in [o async for o in stream] for t in o.new_token_ids])

    # replicas lost while their requests stream: replica 1's node removed under 16 streams, then replica 2's
    # actor killed for good; their requests carry on on the survivors from the tokens their streams hold
    kinds = [(PROMPT, "greedy"), (PROMPT, "penalties"), (PROMPTS[1], "greedy")]
    for name, victim, kill, count in (("node_removed", 1, lambda: ray_cluster.remove_node(nodes[1]), 16),
                                      ("actor_killed", 2, lambda: ray.kill(replicas[2].actor, no_restart=True), 3)):
        cluster = Cluster(replicas, ToReplica(victim))
        streams = [await cluster.add_request(tokenizer.encode(kinds[k % 3][0]), params_of(kinds[k % 3][1]),
                                             f"{name}-{k}") for k in range(count)]
        tokens = [[] for _ in streams]

        first = asyncio.get_running_loop().create_future()
        readers = [asyncio.ensure_future(_read(stream, into, first)) for stream, into in zip(streams, tokens,
                                                                                                strict=True)]
        await first
        at_loss = [len(t) for t in tokens]
        kill()
        start = time.perf_counter()
        errors = [repr(e) for e in await asyncio.gather(*readers, return_exceptions=True) if e is not None]
        stats = router_stats(cluster)  # what gRPC Stats reports
        out[name] = {"tokens": tokens, "errors": errors, "failover": dict(cluster.failover), "at_loss": at_loss,
                     "stats": {field: getattr(stats, field) for field in ("replicas_lost", "requests_resumed",
                                                                           "requests_failed")},
                     "seconds_after_loss": time.perf_counter() - start}
    out["pools_after_loss"] = ray.get([replicas[0].actor.pool.remote()])
    out["expected"] = expected
    return out


async def kill_and_wait(replica) -> None:
    """Kill ``replica``'s actor (Ray restarts it) and return once its process is gone: ``ray.kill`` only
    sends the signal, and a call sent right after it could still be served by the dying process."""
    import ray

    pid = replica.facts["pid"]
    ray.kill(replica.actor, no_restart=False)
    while True:
        try:  # the old process answers at once while it lives; a call to a restarting actor waits
            facts = await asyncio.wait_for(asyncio.ensure_future(replica.actor.describe.remote()), 1.0)
        except (ray.exceptions.RayActorError, TimeoutError):
            return
        if facts["pid"] != pid:
            return
        await asyncio.sleep(0.02)


def after(replica, method: str, action, when=None) -> None:
    """Run ``action`` (awaited if it returns an awaitable) once ``replica.method`` next returns (and
    ``when(result)`` holds, if given): a fault injected at that step, in place before the step's caller
    goes on."""
    original = getattr(replica, method)

    async def hooked(*args, **kwargs):
        result = await original(*args, **kwargs)
        if (when is None or when(result)) and replica.__dict__.pop(method, None) is not None:
            done = action()
            if inspect.isawaitable(done):
                await done
        return result
    replica.__dict__[method] = hooked


async def one_move(cluster, tokenizer, params, request_id: str, src: int, dst: int) -> dict:
    """A request on ``src`` moved to ``dst`` once it has 4 tokens: its tokens, errors and the move's outcome."""
    from jaxinfer.router.base import Migration
    from tests.engine.test_migration import PROMPT

    tokens, task, errors = [], None, []
    try:
        stream = await cluster.add_request(tokenizer.encode(PROMPT), params, request_id)
        async for output in stream:
            tokens += output.new_token_ids
            if task is None and len(tokens) >= 4:
                task = asyncio.ensure_future(cluster.migrate(Migration(request_id, src, dst, "test")))
    except Exception as exc:  # noqa: BLE001 - reported
        errors.append(repr(exc))
    moved = await task if task is not None else None
    return {"tokens": tokens, "errors": errors, "moved": moved, "stats": cluster.stats.as_dict()}


async def _read(stream, tokens: list, first_tokens: asyncio.Future) -> None:
    """A stream's tokens into ``tokens``; ``first_tokens`` is set once it has 10."""
    async for output in stream:
        tokens += output.new_token_ids
        if len(tokens) >= 10 and not first_tokens.done():
            first_tokens.set_result(None)


def main() -> None:
    from jaxinfer.sampling_params import SamplingParams
    from tests.engine.test_migration import PROMPT
    from tests.engine.tiny_engine import CharTokenizer
    from tests.replicas.local_ray import local_ray

    def params_of(kind):
        extra = dict(temperature=0.8, seed=7, repetition_penalty=1.3, frequency_penalty=0.2) \
            if kind == "penalties" else dict(temperature=0.0)
        return SamplingParams(max_tokens=70 if kind != "serving" else 30, ignore_eos=True, **extra)

    tokenizer = CharTokenizer()
    started = time.perf_counter()
    with local_ray(NODES) as (cluster, nodes, _):
        from jaxinfer.replicas.ray_replica import measure_links, start_replicas

        replicas = start_replicas(replica_engine, NODES, warm_up=False,
                                  options=[{"num_cpus": 1, "resources": {f"host{i}": 1}} for i in range(NODES)])
        for replica in replicas:
            replica.silence_seconds = 5.0  # a killed actor's stream may stay open until Ray restarted it
        up = time.perf_counter() - started
        links = measure_links(replicas, nbytes=4 << 20)
        reference = replica_engine()
        expected = {
            "serving": [o.output_ids for o in reference.generate([tokenizer.encode(p) for p in PROMPTS],
                                                                  params_of("serving"))],
            "greedy": reference.generate([tokenizer.encode(PROMPT)], params_of("greedy"))[0].output_ids,
            "penalties": reference.generate([tokenizer.encode(PROMPT)], params_of("penalties"))[0].output_ids,
            "second": reference.generate([tokenizer.encode(PROMPTS[1])], params_of("greedy"))[0].output_ids}
        result = asyncio.run(scenarios(replicas, expected, params_of, cluster, nodes))
        result["startup_seconds"] = up
        result["links"] = {f"{s}->{d}": v for (s, d), v in links.items()}
        for replica in replicas:
            replica.shutdown(timeout=5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
