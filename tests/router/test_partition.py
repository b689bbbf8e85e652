"""The DP stage partition: equal to brute force, fast enough, and sensible on shaped demand."""

import numpy as np
import pytest

from jaxinfer.router.cost_model import CostModel
from jaxinfer.router.partition import (
    Demand,
    StagePlan,
    brute_force_partition,
    default_grid,
    demand_from_requests,
    partition,
    stage_costs,
)

CM = CostModel.synthetic(max_len=32768)


def _random_demand(rng, grid, load):
    """Random requests whose total marginal work is about ``load`` replica-seconds per second."""
    n = 400
    prompts = np.exp(rng.uniform(np.log(32), np.log(grid[-1] / 2), n)).astype(int)
    outputs = np.exp(rng.uniform(np.log(8), np.log(grid[-1] / 4), n)).astype(int)
    _, b, c = CM.decode_fit()
    work = np.sum(outputs * (b + c * (prompts + outputs)) + 5e-5 * prompts)
    return demand_from_requests(list(zip(prompts, outputs, strict=True)), grid, work / load)


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    grid = (0, *sorted(rng.choice(np.arange(1, 64) * 256, 4, replace=False).tolist()), 16384)
    n = int(rng.integers(2, 7))
    demand = _random_demand(rng, grid, load=rng.uniform(0.2, 0.6) * n)
    dp = partition(demand, grid, n, CM)
    assert dp.num_replicas == n
    demand = demand.scaled(dp.load_scale)  # < 1 when the random demand overloads every partition
    brute = brute_force_partition(demand, grid, n, CM)
    assert dp.cost == pytest.approx(brute.cost, rel=1e-9)
    if dp != brute:  # a different partition is only allowed as an exact tie
        q = stage_costs(demand, grid, n, CM)
        idx = [grid.index(b) for b in dp.boundaries]
        again = sum(q[idx[s], idx[s + 1], m] for s, m in enumerate(dp.replica_counts))
        assert again == pytest.approx(brute.cost, rel=1e-9)


def test_dp_runs_at_k32_n64():
    grid = default_grid(131072, num_buckets=32)
    assert len(grid) - 1 == 32
    rng = np.random.default_rng(0)
    plan = partition(_random_demand(rng, grid, load=30.0), grid, 64, CostModel.synthetic())
    assert plan.num_replicas == 64 and set(plan.boundaries) <= set(grid) and np.isfinite(plan.cost)


def test_separates_two_length_clusters():
    grid = (0, 512, 1024, 2048, 4096, 8192, 16384)
    short = [(200, 100)] * 900
    long = [(9000, 300)] * 100
    demand = demand_from_requests(short + long, grid, window_seconds=10.0)
    plan = partition(demand, grid, 8, CM)
    assert plan.num_stages >= 2
    assert plan.stage_of(300) != plan.stage_of(9300)  # short and long requests never share a batch
    assert plan.stage_of(9000) == plan.num_stages - 1


def test_more_long_demand_gets_more_long_replicas():
    grid = (0, 1024, 4096, 16384)

    def long_replicas(num_long):
        demand = demand_from_requests([(300, 200)] * 1000 + [(8000, 400)] * num_long, grid, 8.0)
        plan = partition(demand, grid, 8, CM)
        return plan.replica_counts[plan.stage_of(8000)]

    assert long_replicas(200) > long_replicas(20)


def test_pluggable_qoe():
    grid = (0, 1024, 4096, 16384)
    demand = demand_from_requests([(300, 2000)] * 200 + [(3000, 300)] * 50, grid, 100.0)
    migrations_only = partition(demand, grid, 4, CM, qoe=lambda est: est.crossing_rate * est.migration_seconds)
    assert migrations_only.num_stages == 1 and migrations_only.cost == 0.0  # no stage boundary, no crossing
    assert partition(demand, grid, 4, CM).num_stages > 1


def test_overload_scales_the_demand_down():
    grid = (0, 1024, 4096, 16384)
    demand = demand_from_requests([(2000, 500)] * 1000, grid, 0.01)
    plan = partition(demand, grid, 2, CM)
    assert plan.load_scale < 1.0 and plan.num_replicas == 2


def test_demand_by_hand():
    grid = (0, 100, 200, 400)
    d = demand_from_requests([(50, 100), (150, 300)], grid, window_seconds=2.0)
    # (50, 100) decodes at [50, 150): 50 in bucket 0, 50 in bucket 1, crossing 100.
    # (150, 300) decodes at [150, 450): 50 in bucket 1, 250 in the last bucket (past 400 counts there).
    assert d.decode.tolist() == [25.0, 50.0, 125.0]
    assert d.prefill.tolist() == [25.0, 75.0, 0.0]
    assert d.arrivals.tolist() == [0.5, 0.5, 0.0]
    assert d.crossing.tolist() == [0.5, 0.5, 0.0]
    weighted = demand_from_requests([(50, 100), (150, 300)], grid, 2.0, weights=[2, 0])
    assert weighted.decode.tolist() == [50.0, 50.0, 0.0]
    approx = Demand.from_rates([10.0, 20.0, 40.0], [100.0, 0.0, 0.0], grid)
    assert approx.crossing.tolist() == [0.1, 0.2, 0.0] and approx.arrivals[0] == pytest.approx(2.0)


def test_stage_plan_and_validation():
    plan = StagePlan((0, 1000, 4000, 16384), (2, 3, 1))
    assert [plan.stage_of(x) for x in (0, 999, 1000, 3999, 4000, 16384, 10**6)] == [0, 0, 1, 1, 2, 2, 2]
    assert list(plan.replicas_of(1)) == [2, 3, 4] and plan.stage_of_replica(5) == 2
    with pytest.raises(ValueError, match="needs 4 boundaries"):
        StagePlan((0, 1000, 16384), (1, 1, 1))
    with pytest.raises(ValueError, match="strictly increase"):
        StagePlan((0, 4000, 1000, 16384), (1, 1, 1))
    with pytest.raises(ValueError, match="at least one replica"):
        StagePlan((0, 1000, 16384), (2, 0))
    with pytest.raises(ValueError, match="boundaries must start at 0"):
        demand_from_requests([(1, 1)], (5, 10), 1.0)
    with pytest.raises(ValueError, match="demand has 2 buckets"):
        stage_costs(demand_from_requests([(1, 1)], (0, 5, 10), 1.0), (0, 5, 10, 20), 2, CM)
