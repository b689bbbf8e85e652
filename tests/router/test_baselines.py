"""Baseline routers behave as named; make_router picks by name."""

import pytest

from jaxinfer.router.base import NewRequest, ReplicaLoad, RequestLoad
from jaxinfer.router.baselines import LeastLoadedRouter, LlumnixRouter, RoundRobinRouter, freeness, make_router
from jaxinfer.router.cascade import CascadeRouter
from jaxinfer.router.cost_model import CostModel

NEW = NewRequest("n", 100, 10)


def rep(i, requests=(), used=0, waiting=0, inflight=0, accepting=True, total=1000):
    return ReplicaLoad(i, tuple(requests), used, total, 16, waiting, inflight, accepting)


def req(rid, ctx, running=True, migrating=False):
    return RequestLoad(rid, ctx, ctx, 100, running, migrating)


def test_round_robin_cycles_over_accepting_replicas():
    r = RoundRobinRouter()
    snaps = [rep(0), rep(1), rep(2, accepting=False), rep(3)]
    assert [r.dispatch(NEW, snaps, 0.0) for _ in range(6)] == [0, 1, 3, 0, 1, 3]


def test_least_loaded_picks_min_virtual_usage_then_queue():
    r = LeastLoadedRouter()
    snaps = [rep(0, used=300), rep(1, used=100, waiting=100), rep(2, used=150), rep(3, used=50, accepting=False)]
    assert r.dispatch(NEW, snaps, 0.0) == 2  # replica 1 has 0.2 virtual usage counting its queue
    queued = [req("w", 10, running=False)]
    snaps = [rep(0, queued, used=150), rep(1, used=150)]
    assert r.dispatch(NEW, snaps, 0.0) == 1  # usage tie: the shorter queue


def test_llumnix_dispatches_to_the_freest():
    snaps = [rep(0, [req("a", 10)] * 4, used=200), rep(1, [req("b", 10)], used=600),
             rep(2, [req("c", 10)] * 2, used=100)]
    # freeness = (free - waiting) / requests: 800/4, 400/1, 900/2
    assert [freeness(s) for s in snaps] == [200, 400, 450]
    assert LlumnixRouter().dispatch(NEW, snaps, 0.0) == 2


def test_llumnix_pairs_most_loaded_with_freest_and_moves_the_shortest():
    r = LlumnixRouter(gap_pages=50)
    snaps = [rep(0, [req("a", 500), req("b", 40), req("c", 900), req("q", 5, running=False)], used=900),
             rep(1, [req("d", 100)], used=100),
             rep(2, [req("e", 300), req("f", 30, migrating=True)], used=800),
             rep(3, [req("g", 100)], used=200),
             rep(4, [req("h", 100)], used=500)]
    # freeness: 0: 25, 1: 900, 2: 100, 3: 800, 4: 500
    orders = r.rebalance(snaps, 0.0)
    assert [(o.request_id, o.src, o.dst, o.reason) for o in orders] == [("b", 0, 1, "balance"), ("e", 2, 3, "balance")]
    snaps[1] = rep(1, [req("d", 100)], used=100, inflight=1)  # one migration in flight per replica
    assert [(o.src, o.dst) for o in r.rebalance(snaps, 0.1)] == [(0, 3), (2, 4)]
    assert LlumnixRouter(gap_pages=10_000).rebalance(snaps, 0.0) == []
    # a lone request would only swap which replica is the loaded one: no move (no ping-pong)
    assert r.rebalance([rep(0, [req("lone", 8000)], used=500), rep(1)], 0.2) == []


def test_make_router():
    cm = CostModel.synthetic(max_len=8192)
    assert isinstance(make_router("cascade", 4, cm, 8192, replan=False), CascadeRouter)
    for name, cls in [("round-robin", RoundRobinRouter), ("least-loaded", LeastLoadedRouter),
                      ("llumnix", LlumnixRouter)]:
        router = make_router(name, 4, cm, 8192)
        assert isinstance(router, cls) and router.describe()["router"] == name
    with pytest.raises(ValueError, match="choose one of cascade, round-robin, least-loaded, llumnix"):
        make_router("random", 4, cm, 8192)
