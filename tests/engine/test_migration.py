"""Moving running requests between replica engines: exact continuation, page accounting, failure
atomicity, one unbroken stream (tiny random model, replicas on the 8 virtual CPU devices)."""

import asyncio
import functools
import time

import pytest

from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxinfer.engine.compile_plan import CompilePlan
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.migration_port import MigrationPort
from jaxinfer.replicas.cluster import Cluster
from jaxinfer.replicas.placement import replica_meshes
from jaxinfer.router.base import Migration, Router
from jaxinfer.sampling_params import SamplingParams
from tests.engine import tiny_engine
from tests.engine.tiny_engine import CharTokenizer, assert_no_leaks

PROMPT = "thequickbrownfoxjumps"


class ToReplica(Router):
    """Sends every new request to one replica; never orders anything by itself."""

    name = "fixed"
    interval = 60.0

    def __init__(self, replica=0):
        self.replica = replica

    def dispatch(self, request, replicas, now):
        return self.replica


@functools.cache
def replica_engine(index, num_pages=64):
    """Engines reused across tests (each test leaves them empty; a Cluster is built per test)."""
    return make_engine(meshes()[index], num_pages)


def make_engine(mesh, num_pages=64, prefix_caching=True):
    # bursts of 2 decode steps: with 4-token pages, longer bursts outrun the pre-copy rounds of a
    # live migration (each round has fewer pages left to copy only while a step adds under a page)
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=96, max_prefill_seqs=2,
                            decode_buckets=(4,), prefill_buckets=(16,), kv_buckets=(96,), decode_steps=2)
    config = EngineConfig(cache=CacheConfig(page_size=4, num_pages=num_pages, enable_prefix_caching=prefix_caching),
                          scheduler=sched, max_logprobs=5)
    engine = Engine(tiny_engine.model(), CharTokenizer(), config, mesh=mesh)
    if mesh is not None:
        engine.runner.warm_up(CompilePlan(page_buckets=engine.runner.page_buckets()))
    return engine


@functools.cache
def meshes():
    return replica_meshes(4)


@functools.cache
def expected(max_tokens=60, **params):
    engine = make_engine(None)
    return engine.generate([PROMPT], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))[0].output_ids


def run_with_migration(mode, *, after=12, fail=None, params=None, last_round_pages=1):
    """Generate on replica 0, order a migration to replica 1 once ``after`` tokens arrived; returns
    (token ids in stream order, the cluster, whether it moved)."""
    params = params or dict(temperature=0.0)
    cluster = Cluster([replica_engine(0), replica_engine(1)], ToReplica(0), migration=mode,
                      last_round_pages=last_round_pages)
    ports = [replica.engine.migration for replica in cluster.replicas]
    if fail is not None:
        fail(cluster)

    async def main():
        stream = await cluster.add_request(CharTokenizer().encode(PROMPT),
                                           SamplingParams(max_tokens=60, ignore_eos=True, **params), "r")
        tokens, moved, task = [], None, None
        async for output in stream:
            tokens += output.new_token_ids
            if task is None and len(tokens) >= after:
                task = asyncio.ensure_future(cluster.migrate(Migration("r", 0, 1, "test")))
        moved = await task
        return tokens, moved
    try:
        tokens, moved = asyncio.run(main())
    finally:
        cluster.shutdown()
        for port in ports:  # undo injected failures
            port.__dict__.pop("commit", None)
            port.__dict__.pop("detach", None)
    return tokens, cluster, moved


@pytest.mark.parametrize("mode", ["live", "recompute"])
def test_migrated_request_continues_exactly(mode):
    tokens, cluster, moved = run_with_migration(mode)
    assert moved and cluster.stats.completed == 1 and getattr(cluster.stats, mode) == 1
    assert tokens == expected()
    if mode == "live":
        assert cluster.stats.pages_copied >= 3
    for replica in cluster.replicas:  # pages freed at the source, and at the destination once done
        assert_no_leaks(replica.engine)
        assert not replica.engine.migration.detached and not replica.engine.migration.incoming


def test_live_migration_with_penalties_and_seed():
    params = dict(temperature=0.8, seed=7, repetition_penalty=1.3, frequency_penalty=0.2)
    tokens, cluster, moved = run_with_migration("live", params=params)
    assert moved
    assert tokens == expected(**params)


def test_failed_commit_leaves_request_at_source():
    def fail(cluster):
        port = cluster.replicas[1].engine.migration

        def broken(moving):
            raise RuntimeError("injected failure at the destination")
        port.commit = broken
    tokens, cluster, moved = run_with_migration("live", fail=fail)
    assert not moved and cluster.stats.failed == 1
    assert tokens == expected()  # finished at the source, stream unbroken
    for replica in cluster.replicas:
        assert_no_leaks(replica.engine)


def test_failed_export_leaves_request_at_source():
    def fail(cluster):
        port = cluster.replicas[0].engine.migration

        def broken(*args):
            raise RuntimeError("injected failure at the source")
        port.detach = broken
    tokens, cluster, moved = run_with_migration("live", fail=fail)
    assert not moved and cluster.stats.failed == 1
    assert tokens == expected()
    for replica in cluster.replicas:
        assert_no_leaks(replica.engine)


def test_destination_without_room_refuses():
    cluster = Cluster([replica_engine(0), replica_engine(2, num_pages=24)], ToReplica(0))

    async def main():
        port = cluster.replicas[1].engine.migration
        assert await cluster.replicas[1].call(lambda a: port.reserve("x", 96))  # the whole small pool
        stream = await cluster.add_request(CharTokenizer().encode(PROMPT), SamplingParams(max_tokens=40,
                                                                                          ignore_eos=True), "r")
        tokens, moved = [], None
        async for output in stream:
            tokens += output.new_token_ids
            if moved is None and len(tokens) >= 5:
                moved = await cluster.migrate(Migration("r", 0, 1, "test"))
        await cluster.replicas[1].call(lambda a: port.cancel("x"))
        return tokens, moved
    try:
        tokens, moved = asyncio.run(main())
    finally:
        cluster.shutdown()
    assert moved is False and cluster.stats.refused == 1
    assert tokens == expected(40)


def test_finished_request_is_not_moved():
    cluster = Cluster([replica_engine(0), replica_engine(1)], ToReplica(0))

    async def main():
        stream = await cluster.add_request(CharTokenizer().encode(PROMPT), SamplingParams(max_tokens=3), "r")
        async for _ in stream:
            pass
        return await cluster.migrate(Migration("r", 0, 1, "test"))
    try:
        assert asyncio.run(main()) is False
    finally:
        cluster.shutdown()
    assert cluster.stats.gone == 1
    for replica in cluster.replicas:
        assert_no_leaks(replica.engine)


def test_port_reserve_refuses_a_second_arrival_of_the_same_request():
    engine = make_engine(None)
    port = MigrationPort(engine)
    assert port.reserve("a", 8)
    with pytest.raises(RuntimeError, match="already"):
        port.reserve("a", 8)
    port.cancel("a")
    assert_no_leaks(engine)


def test_port_holds_expire_so_a_silent_driver_leaves_nothing_held():
    engine = make_engine(None)
    port = MigrationPort(engine)
    assert port.reserve("a", 8, hold_seconds=30.0) and port.holding
    assert port.expire() == []  # not yet
    assert port.expire(now=time.monotonic() + 31) == ["a"]
    assert not port.incoming and not port.holding
    with pytest.raises(RuntimeError, match="no reservation for 'a'"):
        port.receive("a", 0, 1, None)
    assert_no_leaks(engine)

    engine.add_request(CharTokenizer().encode(PROMPT), SamplingParams(max_tokens=30, ignore_eos=True), "r")
    for _ in range(3):
        engine.step()
    assert port.detach("r", 0, None, hold_seconds=5.0) is not None
    assert port.expire(now=time.monotonic() + 6) == ["r"]  # released: its pages are free again
    assert not port.reattach("r")  # gone: the driver must resume it from its own record
    while engine.has_unfinished:  # the outputs of the steps before the detach
        engine.step()
    assert_no_leaks(engine)


def test_a_replica_loop_expires_an_unclaimed_reservation():
    cluster = Cluster([replica_engine(0), replica_engine(1)], ToReplica(0))
    replica = cluster.replicas[1]

    async def main():
        assert await replica.reserve("orphan", 20, hold_seconds=0.2)
        assert await replica.call(lambda a: sorted(a.engine.migration.incoming)) == ["orphan"]
        await asyncio.sleep(0.6)  # the idle loop wakes every 50 ms
        return await replica.call(lambda a: (sorted(a.engine.migration.incoming), a.engine.block_manager.num_free))
    try:
        incoming, free = asyncio.run(main())
    finally:
        cluster.shutdown()
    assert incoming == [] and free == replica.engine.block_manager.num_pages


def test_auto_migration_weighs_the_links_measured_bandwidth():
    from jaxinfer.replicas.migration import migration_mode
    from jaxinfer.router.cost_model import CostModel

    cost_model = CostModel.synthetic(max_len=16384)
    tokens = 4096
    assert migration_mode("auto", cost_model, tokens) == "live"  # the profile's 25 GB/s link
    slow = cost_model.kv_bytes_per_token * tokens / (10 * cost_model.recompute_seconds(tokens))
    assert migration_mode("auto", cost_model, tokens, bytes_per_second=slow) == "recompute"
    assert migration_mode("live", cost_model, tokens, bytes_per_second=slow) == "live"  # as configured
