"""The simulator: hand-checked batching arithmetic, conservation, migrations and determinism."""

import dataclasses

import numpy as np
import pytest

from jaxinfer.router.base import Migration, Router
from jaxinfer.router.baselines import make_router
from jaxinfer.router.cost_model import CostModel
from jaxinfer.router.sim import Simulator

DEC, PRE = (0.01, 0.001, 1e-6), (0.02, 1e-4, 1e-8)
SMALL = CostModel.synthetic(decode=DEC, prefill=PRE, max_len=4096, kv_capacity_tokens=16384, page_size=16,
                            max_num_seqs=4, max_num_batched_tokens=64)


def decode(b, s):
    return DEC[0] + DEC[1] * b + DEC[2] * b * s


def prefill(t, s):
    return PRE[0] + PRE[1] * t + PRE[2] * t * s


class Fixed(Router):
    """Everything to one replica; one migration order once a request qualifies."""

    interval = 0.05

    def __init__(self, target=0, move_at=None, dst=1):
        self.target, self.move_at, self.dst, self.done = target, move_at, dst, False

    def dispatch(self, request, replicas, now):
        return self.target

    def rebalance(self, replicas, now):
        if self.move_at is None or self.done:
            return []
        for r in replicas[self.target].requests:
            if r.running and not r.migrating and r.generated >= self.move_at:
                self.done = True
                return [Migration(r.request_id, self.target, self.dst, "balance")]
        return []


def test_single_replica_fcfs_by_hand():
    result = Simulator(Fixed(), SMALL, 1, [(0.0, 100, 3), (0.0, 20, 2)]).run()
    a, b = result.records
    t1 = prefill(64, 256)  # A's first chunk alone: 64 tokens (budget), KV 64 -> bucket 256
    t2 = prefill(64, 256)  # A's last 36 + B's 20 = 56 -> 64 tokens, KV 100 + 20 -> 256
    # both decode: contexts 101 and 21 (synthetic mix 0.1: a row length of 61 + 0.1 * 40); then A alone
    t3 = decode(2, 65)
    t4 = decode(1, 102)
    assert a.first_token == pytest.approx(t1 + t2) and b.first_token == pytest.approx(t1 + t2)
    assert b.finish == pytest.approx(t1 + t2 + t3)
    assert a.finish == pytest.approx(t1 + t2 + t3 + t4)
    assert result.summary["mean_e2e"] == pytest.approx((a.finish + b.finish) / 2)


def test_admission_waits_for_pages():
    tiny = dataclasses.replace(SMALL, kv_capacity_tokens=160)  # 10 pages
    a, b = Simulator(Fixed(), tiny, 1, [(0.0, 100, 3), (0.0, 100, 3)]).run().records
    assert b.first_token > a.finish  # A holds 7 pages, B's first chunk needs 4


def _trace(n, seed, rate, max_prompt=3000, max_output=400):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    prompts = np.exp(rng.uniform(np.log(16), np.log(max_prompt), n)).astype(int)
    outputs = np.exp(rng.uniform(0, np.log(max_output), n)).astype(int) + 1
    return list(zip(arrivals.tolist(), prompts.tolist(), outputs.tolist(), strict=True))


@pytest.mark.parametrize("name", ["cascade", "llumnix", "round-robin"])
def test_conservation_and_no_page_leaks(name):
    cm = CostModel.synthetic(max_len=8192, kv_capacity_tokens=8192)  # small pools: preemptions happen
    trace = _trace(600, seed=1, rate=60.0)
    sim = Simulator(make_router(name, 4, cm, 8192), cm, 4, trace, migration="auto")
    result = sim.run()
    assert len(result.records) == len(trace) and len({r.request_id for r in result.records}) == len(trace)
    for rec, (arrival, prompt, output) in zip(result.records, trace, strict=True):
        assert (rec.arrival, rec.prompt_len, rec.output_len) == (arrival, prompt, output)
        assert arrival <= rec.first_token <= rec.finish
    for rep in sim.replicas:
        assert rep.used_pages == 0 and rep.waiting_pages == 0 and not rep.running and not rep.waiting
        assert rep.migrations_in_flight == 0
    assert result.summary["preemptions_per_request"] > 0
    if name != "round-robin":
        assert result.summary["migrations_per_request"] > 0


def test_live_migration_pauses_less_than_recompute_for_long_contexts():
    cm = CostModel.synthetic(max_len=131072)
    paused, finish = {}, {}
    for mode in ("live", "recompute"):
        result = Simulator(Fixed(move_at=20), cm, 2, [(0.0, 60000, 200)], migration=mode).run()
        (rec,) = result.records
        assert rec.migrations == 1 and rec.replica == 1
        paused[mode], finish[mode] = rec.paused_seconds, rec.finish
    assert paused["live"] < 0.1 < 1.0 < paused["recompute"]  # recompute re-prefills 60K tokens
    assert finish["live"] < finish["recompute"]
    auto = Simulator(Fixed(move_at=20), cm, 2, [(0.0, 60000, 200)], migration="auto").run()
    assert auto.summary["migrations"]["live"] == 1


def test_abort_when_destination_full_leaves_the_request_at_the_source():
    cm = CostModel.synthetic(max_len=8192, kv_capacity_tokens=4096)

    class Route(Fixed):
        def dispatch(self, request, replicas, now):
            return 1 if request.prompt_len > 2000 else 0

    # the big request fills replica 1 (219 of 256 pages) before the small one asks for 63 there
    result = Simulator(Route(move_at=5), cm, 2, [(0.0, 3500, 500), (0.5, 1000, 300)]).run()
    big, small = result.records
    assert result.summary["migrations"]["aborted_dst_full"] == 1
    assert small.migrations == 0 and small.replica == 0 and big.replica == 1


def test_abort_when_the_request_finishes_during_precopy():
    slow_link = CostModel.synthetic(max_len=8192, copy_bytes_per_second=1e6)
    result = Simulator(Fixed(move_at=5), slow_link, 2, [(0.0, 4000, 12)]).run()
    (rec,) = result.records
    assert result.summary["migrations"]["aborted_finished"] == 1 and rec.replica == 0 and rec.migrations == 0


class Counting(Fixed):
    def __init__(self):
        super().__init__()
        self.ticks = []

    def rebalance(self, replicas, now):
        self.ticks.append((now, sum(len(r.requests) for r in replicas)))
        return []


def test_ticks_skip_the_idle_gaps_and_only_them():
    router = Counting()
    result = Simulator(router, SMALL, 1, [(0.0, 100, 3), (1000.0, 20, 2)]).run()
    assert [r.finish is not None for r in result.records] == [True, True]
    # busy ticks every interval; across the 1000 s gap a single tick (not 20000) lands on the next arrival
    assert len(router.ticks) < 20
    times = [t for t, _ in router.ticks]
    assert all(b - a == pytest.approx(0.05) for a, b in zip(times, times[1:], strict=False) if b < 1000)
    later = [t for t in times if t >= 1000]
    assert later and later[0] - 1000 < 0.05 + 1e-9  # the first tick after the gap is on the old grid, not late
    assert sum(n == 0 for _, n in router.ticks) == 1  # the one tick that found the cluster empty and skipped


def test_deterministic():
    cm = CostModel.synthetic(max_len=8192, kv_capacity_tokens=50000)
    trace = _trace(400, seed=2, rate=30.0)
    runs = [Simulator(make_router("cascade", 4, cm, 8192), cm, 4, trace).run() for _ in range(2)]
    assert runs[0].records == runs[1].records
    assert runs[0].occupancy == runs[1].occupancy
    timing = {"router_seconds", "router_ms_per_decision", "dispatch_us", "rebalance_us", "dispatch_seconds",
              "rebalance_seconds"}
    assert {k: v for k, v in runs[0].summary.items() if k not in timing} == {
        k: v for k, v in runs[1].summary.items() if k not in timing}


def test_bad_input():
    with pytest.raises(ValueError, match="migration must be one of auto, live, recompute"):
        Simulator(Fixed(), SMALL, 1, [], migration="teleport")
    with pytest.raises(ValueError, match="prompt \\+ output <= KV capacity 16384"):
        Simulator(Fixed(), SMALL, 1, [(0.0, 16000, 1000)])
    with pytest.raises(ValueError, match="dispatched to 3, not an accepting replica"):
        Simulator(Fixed(target=3), SMALL, 2, [(0.0, 10, 2)]).run()


def test_host_slowdown_stretches_concurrent_steps():
    trace = [(0.0, 20, 2), (0.0, 20, 2)]
    alone = Simulator(Fixed(), SMALL, 2, trace).run().records

    class Spread(Fixed):
        def dispatch(self, request, replicas, now):
            return int(request.request_id[1:])

    apart = Simulator(Spread(), SMALL, 2, trace).run().records
    shared = Simulator(Spread(), SMALL, 2, trace, host_slowdown=[1.0, 3.0]).run().records
    p, d = prefill(32, 256), decode(1, 21)  # prompt 20 -> 32 tokens, then one decode at context 21
    assert apart[0].finish == pytest.approx(p + d) and apart[1].finish == pytest.approx(p + d)
    assert alone[1].finish > p + d
    # replica 0 starts alone, then decodes while replica 1 still prefills (x3); replica 1 prefills
    # while replica 0 is busy (x3), then decodes alone
    assert shared[0].finish == pytest.approx(p + 3 * d) and shared[1].finish == pytest.approx(3 * p + d)
    with pytest.raises(ValueError, match="host_slowdown must be positive"):
        Simulator(Fixed(), SMALL, 1, trace, host_slowdown=[])
