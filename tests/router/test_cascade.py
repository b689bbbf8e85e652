"""The cascade router: dispatch, hand-off, within-stage balance, range refinement and re-planning."""

import numpy as np
import pytest

from jaxinfer.router.base import NewRequest, ReplicaLoad, RequestLoad
from jaxinfer.router.baselines import LeastLoadedRouter
from jaxinfer.router.cascade import CascadeRouter
from jaxinfer.router.cost_model import CostModel
from jaxinfer.router.partition import StagePlan
from jaxinfer.router.sim import Simulator

CM = CostModel.synthetic(max_len=16384)
GRID = (0, 500, 1000, 2000, 4000, 8000, 16384)
PLAN = StagePlan((0, 1000, 4000, 16384), (2, 2, 1))  # stage 0: replicas 0-1, stage 1: 2-3, stage 2: 4


def rep(i, requests=(), used=0, total=1000, inflight=0, accepting=True, step=0.0):
    return ReplicaLoad(i, tuple(requests), used, total, 16, 0, inflight, accepting, step)


def req(rid, ctx, running=True, migrating=False):
    return RequestLoad(rid, min(ctx, 100), ctx, 4096, running, migrating)


def router(plan=PLAN, **kw):
    kw.setdefault("refine", False)
    kw.setdefault("replan", False)
    return CascadeRouter(plan.num_replicas, CM, 16384, plan=plan, grid=GRID, **kw)


def test_dispatch_picks_the_stage_then_the_least_loaded():
    r = router(within_stage="least-loaded")
    snaps = [rep(0, used=500), rep(1, used=200), rep(2, [req("x", 10, running=False)], used=100),
             rep(3, [req("y", 10)] * 2, used=100), rep(4, used=900)]
    assert r.dispatch(NewRequest("a", 500, 10), snaps, 0.0) == 1
    assert r.dispatch(NewRequest("b", 2000, 10), snaps, 0.0) == 3  # usage tie: the shorter queue
    assert r.dispatch(NewRequest("c", 20000, 10), snaps, 0.0) == 4  # past max_len: the last stage
    snaps[4] = rep(4, accepting=False)
    assert r.dispatch(NewRequest("d", 9000, 10), snaps, 0.0) == 3  # nearest stage with a live replica
    snaps[2], snaps[3], snaps[4] = rep(2, accepting=False), rep(3, accepting=False), rep(4)
    assert r.dispatch(NewRequest("e", 2000, 10), snaps, 0.0) == 4  # equidistant: downstream first


def test_llumnix_stages_dispatch_to_the_freest_replica_of_the_stage():
    r = router()  # an operator's multi-stage plan: llumnix within stages
    # stage 0: replica 0 has 500 free pages for 1 request, replica 1 has 800 for 4 (200 per request)
    snaps = [rep(0, [req("x", 10)], used=500), rep(1, [req(f"y{k}", 10) for k in range(4)], used=200), rep(2),
             rep(3), rep(4)]
    assert r.dispatch(NewRequest("a", 500, 10), snaps, 0.0) == 0  # least-loaded would pick replica 1
    assert router(within_stage="least-loaded").dispatch(NewRequest("a", 500, 10), snaps, 0.0) == 1


def test_one_stage_plan_is_least_loaded_dispatch():
    r = router(plan=StagePlan.single(4, 16384))
    ll = LeastLoadedRouter()
    rng = np.random.default_rng(0)
    for t in range(50):
        snaps = [rep(i, [req(f"{i}-{k}", int(rng.integers(10, 3000)), running=bool(rng.integers(2)))
                         for k in range(int(rng.integers(0, 4)))], used=int(rng.integers(0, 3)) * 100)
                 for i in range(4)]
        new = NewRequest(f"n{t}", int(rng.integers(1, 16384)), 10)
        assert r.dispatch(new, snaps, t) == ll.dispatch(new, snaps, t)
        assert r.rebalance(snaps, t) == []  # no within-stage moves: usage gaps up to 0.2 stay


def test_handoff_goes_downstream_to_the_owning_stage_past_the_slack():
    r = router(max_concurrent=3)
    stage0 = [req("in_slack", 1030), req("due", 1100), req("far", 5000), req("waiting", 6000, running=False),
              req("moving", 7000, migrating=True)]
    snaps = [rep(0, stage0, used=300), rep(1), rep(2, used=400), rep(3, used=100),
             rep(4, [req("last", 100_000)], used=500)]
    orders = r.rebalance(snaps, 0.1)
    assert {(o.request_id, o.src, o.dst, o.reason) for o in orders} == {("far", 0, 4, "handoff"),
                                                                        ("due", 0, 3, "handoff")}
    # slack is max(page, 4% of hi): 1040 tokens for hi = 1000
    assert r.config.slack_fraction * 1000 == 40


def test_handoff_never_upstream_and_respects_limits():
    r = router(max_concurrent=1)
    snaps = [rep(0, [req("due", 1100), req("far", 5000)], used=300), rep(1), rep(2, [req("short", 300)]), rep(3),
             rep(4)]
    orders = r.rebalance(snaps, 0.1)
    assert [(o.request_id, o.dst) for o in orders] == [("far", 4)]  # one at a time, longest first
    snaps[0] = rep(0, [req("due", 1100)], used=300, inflight=1)
    assert r.rebalance(snaps, 0.2) == []  # the source has a migration in flight
    snaps[0], snaps[1] = rep(0, [req("due", 1100)], used=300), rep(1, used=300)  # (no balance move in stage 0)
    snaps[2], snaps[3] = rep(2, inflight=1), rep(3, used=950)  # busy and full destinations
    assert r.rebalance(snaps, 0.3) == []


def test_within_stage_balance_moves_the_shortest_request_to_the_freest_peer_of_its_stage():
    plan = StagePlan((0, 8000, 16384), (2, 1))
    r = router(plan=plan)
    assert r.within_stage == "llumnix"  # an operator's multi-stage plan balances (within_stage auto, no check)
    heavy = [req("a", 1600), req("b", 1610), req("c", 160), req("d", 6400)]  # 100, 101, 10, 400 pages
    snaps = [rep(0, heavy, used=500), rep(1, used=100), rep(2)]
    orders = r.rebalance(snaps, 0.1)
    # freeness (free pages per request): 125, 900 and 1000, but replica 2 is another stage's
    assert [(o.request_id, o.src, o.dst, o.reason) for o in orders] == [("c", 0, 1, "balance")]
    snaps = [rep(0, [req("c", 160)], used=100), rep(1, used=100), rep(2)]
    assert r.rebalance(snaps, 0.2) == []  # freeness gap 0 <= balance_gap_pages
    snaps = [rep(0, heavy, used=500), rep(1, used=100, inflight=1), rep(2)]
    assert r.rebalance(snaps, 0.3) == []  # one move at a time per replica
    off = router(plan=plan, within_stage="least-loaded")
    assert off.rebalance([rep(0, heavy, used=500), rep(1, used=100), rep(2)], 0.1) == []


def _ticks(r, t0, seconds, arrivals=()):
    """Rebalance ticks for ``seconds``; each tick dispatches and finishes the (prompt, output) pairs."""
    t, k = t0, 0
    while t < t0 + seconds - 1e-9:
        t += 0.1
        for p, o in arrivals:
            r.dispatch(NewRequest(f"q{k}", p, o), [rep(i) for i in range(r.num_replicas)], t)
            r.on_finish(f"q{k}", p, o, t)
            k += 1
        r.rebalance([rep(i) for i in range(r.num_replicas)], t)
    return t


def _scripted(r, costs):
    """Make boundary 1's two-stage cost at grid point g equal costs[g] (other boundaries: flat)."""
    def stage_costs(demand):
        q = np.ones((len(GRID), len(GRID), r.num_replicas + 1))
        hi = GRID.index(r.boundaries[2])
        for g, c in costs.items():
            q[0, GRID.index(g), 2], q[GRID.index(g), hi, 2] = c, 0.0
        return q
    r._stage_costs = stage_costs


def test_refinement_moves_one_step_after_persistent_gain():
    r = router(refine=True, refine_interval=1.0, min_replan_samples=20)
    r.on_finish("x", 100, 10, 0.0)
    t = _ticks(r, 0.0, 0.1, [(300, 50)] * 30)  # demand in the window
    _scripted(r, {500: 0.9, 1000: 1.0, 2000: 1.0})  # lowering gains 10% > eps = 5%
    t = _ticks(r, t, 1.0)
    assert r.boundaries == [0, 1000, 4000, 16384]  # one check is not enough
    t = _ticks(r, t, 1.0)
    assert r.boundaries == [0, 500, 4000, 16384] and r.describe()["refinements"] == 1
    r = router(refine=True, refine_interval=1.0, min_replan_samples=20)
    t = _ticks(r, 0.0, 0.1, [(300, 50)] * 30)
    _scripted(r, {500: 1.0, 1000: 1.0, 2000: 0.5})
    _ticks(r, t, 2.0)
    assert r.boundaries == [0, 2000, 4000, 16384]  # raising is cheaper
    r = router(refine=True, refine_interval=1.0, min_replan_samples=20)
    t = _ticks(r, 0.0, 0.1, [(300, 50)] * 30)
    _scripted(r, {500: 0.98, 1000: 1.0, 2000: 0.99})
    _ticks(r, t, 5.0)
    assert r.boundaries == [0, 1000, 4000, 16384]  # gains below eps: no move


def test_refinement_hysteresis():
    r = router(refine=True, refine_interval=1.0, min_replan_samples=20, window_seconds=100.0)
    t = _ticks(r, 0.0, 0.1, [(300, 50)] * 30)
    _scripted(r, {500: 0.8, 1000: 1.0, 2000: 1.0})
    t = _ticks(r, t, 2.0)
    assert r.boundaries[1] == 500
    _scripted(r, {500: 1.0, 1000: 0.92, 2000: 1.0})  # undoing gains 8%: beyond eps, not 2 * eps
    t = _ticks(r, t, 4.0)
    assert r.boundaries[1] == 500
    _scripted(r, {500: 1.0, 1000: 0.8, 2000: 1.0})  # 20%: undo, then wait 2 intervals before another
    t = _ticks(r, t, 2.0)
    assert r.boundaries[1] == 1000
    _scripted(r, {500: 0.5, 1000: 1.0, 2000: 1.0})
    t = _ticks(r, t, 1.0)
    assert r.boundaries[1] == 1000  # frozen after the reversal
    t = _ticks(r, t, 3.0)
    assert r.boundaries[1] == 500  # second reversal: now it stays for good
    _scripted(r, {500: 1.0, 1000: 0.1, 2000: 1.0})
    _ticks(r, t, 20.0)
    assert r.boundaries[1] == 500 and r.describe()["refinements"] == 3


def test_refinement_sheds_an_overloaded_stage():
    r = router(refine=True, refine_interval=1.0, min_replan_samples=50, window_seconds=5.0)
    # 30 req/s each of 300- and 800-token prompts: more prefill than stage 0's two replicas can take
    # (modelled utilisation ~0.93 > 0.9); the 800s fit in stage 1
    t = _ticks(r, 0.0, 1.5, [(800, 50)] * 3 + [(300, 50)] * 3)
    assert r.boundaries[1] == 1000
    _ticks(r, t, 1.0, [(800, 50)] * 3 + [(300, 50)] * 3)
    assert r.boundaries[1] == 500


def test_refinement_settles_on_a_stationary_simulated_workload():
    rng = np.random.default_rng(3)
    n = 3000
    arrivals = np.cumsum(rng.exponential(1 / 30.0, n))
    prompts = np.exp(rng.uniform(np.log(100), np.log(6000), n)).astype(int)
    outputs = np.exp(rng.uniform(np.log(20), np.log(600), n)).astype(int)
    trace = list(zip(arrivals.tolist(), prompts.tolist(), outputs.tolist(), strict=True))
    # plan for a shorter mix than the one that comes: refinement has to adapt the boundaries
    sample = [(max(p // 4, 1), o) for _, p, o in trace[:500]]
    r = CascadeRouter(6, CM, 16384, sample=sample, sample_window_seconds=trace[499][0], grid=GRID, replan=False,
                      refine_interval=1.0, check_plans=False)
    result = Simulator(r, CM, 6, trace).run()
    history = result.occupancy["boundaries"]
    assert len(history) > 1000 and r.describe()["refinements"] > 0  # it did refine, then settled
    tail = history[len(history) // 2:]
    for b in range(1, len(tail[0]) - 1):
        values = [row[b] for row in tail]
        changes = [v for prev, v in zip(values, values[1:], strict=False) if v != prev]
        assert len(changes) <= 1, f"boundary {b} keeps moving: {changes}"


def _feed_chats_then(r, drift):
    """6 s of chats at 20 req/s (each finishing at once), then 6 s more: long documents if ``drift``,
    else the same chats; a rebalance tick every 0.1 s. Returns the last tick's time."""
    rng = np.random.default_rng(0)
    t, k = 0.0, 0
    for phase in range(2):
        for _ in range(60):
            t += 0.1
            for _ in range(2):
                p, o = (8000, 400) if drift and phase else (int(rng.integers(100, 600)), int(rng.integers(50, 200)))
                r.dispatch(NewRequest(f"q{k}", p, o), [rep(i) for i in range(5)], t)
                r.on_finish(f"q{k}", p, o, t)
                k += 1
            r.rebalance([rep(i) for i in range(5)], t)
    return t


def test_replan_on_drift_only():
    def run(drift):
        r = router(replan=True, replan_interval=1.0, window_seconds=5.0, min_replan_samples=50)
        r.set_plan(PLAN)  # an operator's plan: the first check takes the observed histogram as reference
        _feed_chats_then(r, drift)
        return r

    assert run(drift=False).describe()["replans"] == 0
    drifted = run(drift=True)
    assert drifted.describe()["replans"] >= 1
    assert drifted.plan.replica_counts[drifted.plan.stage_of(8000)] >= 2  # the long requests get more replicas


def test_admin_api_validation_and_describe():
    r = router()
    r.set_boundaries([0, 2000, 8000, 16384])
    assert r.stage_of(1999) == 0 and r.stage_of(2000) == 1
    d = r.describe()
    assert d["router"] == "cascade" and d["stages"][1] == {"lo": 2000, "hi": 8000, "replicas": [2, 3]}
    assert d["refinements"] == 0 and d["replans"] == 0
    with pytest.raises(ValueError, match="3 stages need 4 boundaries"):
        r.set_boundaries([0, 16384])
    with pytest.raises(ValueError, match="strictly up"):
        r.set_boundaries([0, 8000, 2000, 16384])
    with pytest.raises(ValueError, match="strictly up"):
        r.set_boundaries([0, 1000, 2000, 9999])
    r.set_plan({"boundaries": [0, 4000, 16384], "replica_counts": [4, 1]})
    assert r.describe()["stages"][0]["replicas"] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="the plan has 4 replicas, the cluster 5"):
        r.set_plan(StagePlan((0, 4000, 16384), (3, 1)))
    with pytest.raises(ValueError, match="needs 'boundaries' and 'replica_counts'"):
        r.set_plan({"boundaries": [0, 16384]})
    with pytest.raises(ValueError, match="balance_gap_pages"):
        router(balance_gap_pages=-1)
    with pytest.raises(ValueError, match="within_stage must be"):
        router(within_stage="sometimes")
    with pytest.raises(ValueError, match="the plan covers 5 replicas up to 16384 tokens, the router 6"):
        CascadeRouter(6, CM, 16384, plan=PLAN)


def _two_mix_trace(n, rate, seed, long_fraction, *, start=0.0, short=((100, 600), (20, 200)),
                   long=((6000, 12000), (200, 1000))):
    """Poisson arrivals from ``start``; short chats and, a ``long_fraction`` of them, long documents
    (each a (prompt range, output range) pair)."""
    rng = np.random.default_rng(seed)
    arrivals = start + np.cumsum(rng.exponential(1 / rate, n))
    is_long = rng.random(n) < long_fraction
    prompts = np.where(is_long, rng.integers(*long[0], n), rng.integers(*short[0], n))
    outputs = np.where(is_long, rng.integers(*long[1], n), rng.integers(*short[1], n))
    return list(zip(arrivals.tolist(), prompts.tolist(), outputs.tolist(), strict=True))


def _checked(trace, cost_model, **kw):
    sample = [(p, o) for _, p, o in trace[:500]]
    kw = {"replan": False, "refine": False, "score_requests": 400, **kw}
    return CascadeRouter(8, cost_model, 16384, sample=sample, sample_window_seconds=trace[499][0], grid=GRID, **kw)


def _scores(r):
    """The last check's scores by (boundaries, replica counts, balancing)."""
    return {(tuple(c["boundaries"]), tuple(c["replica_counts"]), c["within_stage"]): c["score"]
            for c in r.last_check["candidates"]}


def test_checked_plan_is_one_stage_when_stages_do_not_help():
    # one length class: the DP still proposes a split, the simulator finds it slower than one stage
    r = _checked(_two_mix_trace(500, 60.0, 1, 0.0), CM)
    scores = _scores(r)
    assert any(len(counts) > 1 for _, counts, _ in scores) and r.num_stages == 1
    assert min(scores[((0, 16384), (8,), "least-loaded")], scores[((0, 16384), (8,), "llumnix")]) == min(
        scores.values())
    # llumnix stages are scored for the DP's optimum and the one-stage plan, and deployed as chosen
    assert sum(policy == "llumnix" for _, _, policy in scores) == 2
    assert r.within_stage == r.last_check["chosen"]["within_stage"]
    assert not any(policy == "llumnix" for _, _, policy in _scores(_checked(_two_mix_trace(500, 60.0, 1, 0.0), CM,
                                                                 within_stage="least-loaded")))
    unchecked = _checked(_two_mix_trace(500, 60.0, 1, 0.0), CM, check_plans=False)
    assert unchecked.num_stages > 1  # what the DP alone would have deployed


def test_checked_plan_is_multi_stage_when_they_help():
    # long documents among chats on a kernel that pads every row to the longest: stages pay off
    padded = CostModel.synthetic(max_len=16384, mix_padding=1.0)
    trace = _two_mix_trace(1500, 20.0, 1, 0.15)
    r = _checked(trace[:500], padded, replan=True)
    scores = _scores(r)
    assert min(scores[((0, 16384), (8,), "least-loaded")], scores[((0, 16384), (8,), "llumnix")]) > 1.1 * min(
        scores.values())
    chosen = r.last_check["chosen"]
    key = (tuple(chosen["boundaries"]), tuple(chosen["replica_counts"]), chosen["within_stage"])
    assert len(key[1]) > 1 and scores[key] == min(scores.values())
    # stages chosen on the first window are one win: the best pooled option runs until a check on
    # arrivals that window did not hold confirms them
    assert r.num_stages == 1 and r._proposal == (key, 1, 0) and r._recheck
    best_pooled = min((k for k in scores if len(k[1]) == 1), key=scores.get)
    assert r.within_stage == best_pooled[2]
    Simulator(r, padded, 8, trace[500:]).run()
    assert r.num_stages > 1 and r.describe()["replans"] >= 1 and r._proposal is None
    sure = _checked(trace[:500], padded, decisive_gain=0.1)  # won by more than decisive_gain: at once
    assert sure.num_stages > 1 and sure._proposal is None and sure.within_stage == chosen["within_stage"]


@pytest.mark.parametrize("audit_interval", [0.0, 5.0])
def test_audits_replace_a_plan_that_was_wrong_from_the_start_on_a_stationary_load(audit_interval):
    # an operator's stages on a load of chats alone (stages split the capacity for nothing); the length
    # histogram never drifts from the first window's, so only an audit checks the plan again
    trace = _two_mix_trace(1500, 60.0, 4, 0.0)
    wrong = StagePlan((0, 300, 16384), (4, 4))
    r = CascadeRouter(8, CM, 16384, plan=wrong, grid=GRID, refine=False, replan_interval=1.0, window_seconds=5.0,
                      min_replan_samples=50, score_requests=200, audit_interval=audit_interval)
    Simulator(r, CM, 8, trace).run()
    info = r.describe()
    if audit_interval:
        assert info["audits"] >= 1 and r.num_stages == 1 and info["replans"] >= 1
        assert info["checks"] <= trace[-1][0] / audit_interval + 1  # no more often than the interval
    else:
        assert info["audits"] == info["checks"] == 0 and r.plan == wrong


def test_a_new_plan_must_beat_the_deployed_one_by_the_switch_gain():
    from jaxinfer.router.partition import demand_from_requests

    deployed = StagePlan((0, 500, 16384), (5, 3))
    sample = [(p, o) for _, p, o in _two_mix_trace(500, 60.0, 1, 0.0)]
    args = (demand_from_requests(sample, GRID, 8.0), sample, np.ones(len(sample)), len(sample) / 8.0)
    eager = _checked(_two_mix_trace(500, 60.0, 1, 0.0), CM, switch_gain=0.0)
    assert eager._choose_plan(*args, (deployed, "llumnix"))[0].num_stages == 1  # one stage simulates faster: switch
    scores = [c["score"] for c in eager.last_check["candidates"]]
    gain = 1 - min(scores) / eager.last_check["candidates"][0]["score"]  # the deployed plan is scored first
    assert 0 < gain < 0.9
    sticky = _checked(_two_mix_trace(500, 60.0, 1, 0.0), CM, switch_gain=0.9)
    assert sticky._choose_plan(*args, (deployed, "llumnix")) == (deployed, "llumnix")  # not better by 90%: keep it


def test_background_replan_is_chosen_off_the_router_loop():
    r = router(replan=True, replan_interval=1.0, window_seconds=5.0, min_replan_samples=50, background=True,
               score_requests=200)
    r.set_plan(PLAN)
    t = _feed_chats_then(r, drift=True)
    assert r._job is not None or r.describe()["replans"] >= 1
    if r._job is not None:
        r._job.result(timeout=60)  # the worker thread finishes; the next tick deploys
        r.rebalance([rep(i) for i in range(5)], t + 0.1)
    assert r._job is None and r.last_check["seconds"] > 0
    r.close()


def test_load_feedback_refinement_follows_a_drifting_mix():
    # chats with a few documents, then a third of the traffic long documents: the upper stage, two
    # replicas sized for the first mix, overloads unless boundaries and replicas follow the load
    def phase(n, rate, seed, long_fraction, start):
        return _two_mix_trace(n, rate, seed, long_fraction, start=start, short=((100, 900), (20, 300)),
                              long=((3000, 7000), (200, 800)))

    first = phase(2000, 30.0, 1, 0.05, 0.0)
    drift_at = first[-1][0]
    trace = first + phase(2000, 12.0, 2, 0.4, drift_at)

    def run(refine):
        r = CascadeRouter(6, CM, 16384, plan=StagePlan((0, 2000, 16384), (4, 2)), grid=GRID, replan=False,
                          refine=refine, refine_interval=1.0)
        result = Simulator(r, CM, 6, trace).run()
        late = [x.finish - x.arrival for x in result.records if x.arrival > drift_at + 10]
        return r, result, float(np.mean(late))

    fixed, _, fixed_e2e = run(False)
    r, result, refined_e2e = run(True)
    assert refined_e2e < 0.3 * fixed_e2e  # measured: 4.3 s against 39 s
    assert r.boundaries[1] > 2000 or len(r._stage_members[1]) > 2  # the long stage got relief
    history = result.occupancy["boundaries"]
    tail = [row[1] for row in history[len(history) * 3 // 4:]]
    assert sum(a != b for a, b in zip(tail, tail[1:], strict=False)) <= 1  # and it settled


def test_plans_are_scored_on_the_window_replayed_as_it_came():
    r = router(replan=True, score_requests=40)
    for k in range(60):  # a burst of 20 at t=1, the rest one a second; every other one finished
        t = 1.0 if k < 20 else float(k - 18)
        r.dispatch(NewRequest(f"q{k}", 100 + k, 10), [rep(i) for i in range(5)], t)
        if k % 2 == 0:
            r.on_finish(f"q{k}", 100 + k, 30 + k, t + 0.5)
    sample, weights = r._window_sample()
    replay = r._window_replay(sample, weights)
    assert [(q.arrival, q.prompt_len) for q in replay] == [(t, p) for t, p, _ in r._arrivals]
    assert all(q.output_len == 30 + k for k, q in enumerate(replay) if k % 2 == 0)  # finished: as observed
    assert all(q.output_len in {30 + j for j in range(0, 60, 2)} for q in replay)  # else drawn from the window
    scored = r._score_requests(sample, weights, 1.0, 5, replay)
    assert [tuple(q) for q in scored] == [tuple(q) for q in replay[-40:]]  # the last score_requests, bursts kept
    thinned = r._score_requests(sample, weights, 1.0, 2, replay)  # 2 of 5 replicas: about 2/5 of them
    assert set(map(tuple, thinned)) <= set(map(tuple, replay)) and 14 <= len(thinned) <= 36


def test_a_lost_replica_leaves_its_stage_and_a_returning_one_rejoins():
    r = router(within_stage="least-loaded")
    r.set_members([0, 1, 3, 4])  # replica 2 (stage 1) lost: the stages keep their ranges, counts scaled
    stages = r.describe()["stages"]
    assert [s["replicas"] for s in stages] == [[0], [1, 3], [4]] or [s["replicas"] for s in stages] == [[0, 1], [3],
                                                                                                        [4]]
    assert 2 not in {i for s in stages for i in s["replicas"]}
    assert r.num_replicas == 4 and r._replan_on_data  # a checked re-plan once the window has requests
    snaps = [rep(i, accepting=i != 2) for i in range(5)]
    assert all(r.dispatch(NewRequest(f"a{k}", length, 10), snaps, 0.0) != 2
               for k, length in enumerate((10, 1500, 3000, 9000)))
    r.set_members([0, 4])  # fewer replicas than stages: one stage of the two left
    assert [s["replicas"] for s in r.describe()["stages"]] == [[0, 4]]
    r.set_members(range(5))  # all back
    assert sorted(i for s in r.describe()["stages"] for i in s["replicas"]) == [0, 1, 2, 3, 4]
    assert r.num_replicas == 5


def test_a_live_replan_is_deployed_only_once_checks_on_disjoint_windows_confirm_it():
    single, two = StagePlan.single(5, 16384), StagePlan((0, 2000, 16384), (3, 2))
    r = router(plan=single, within_stage="auto", score_requests=100)
    assert r._scored_arrivals() == 100

    def check(plan, policy, arrivals=100, **kw):  # a check after this many more arrivals chose plan, policy
        r._dispatched += arrivals
        r._checked_at = r._dispatched
        r._deploy(plan, policy, **kw)

    check(two, "least-loaded")  # one check's win: proposed, checked again once the window is fresh
    assert r.plan == single and r._recheck and r.describe()["replans"] == 0
    check(single, "llumnix")  # the next check prefers another change: the count starts over
    check(single, "llumnix", arrivals=60)  # a win on a window sharing arrivals with the last: not counted
    assert r.within_stage == "least-loaded" and r._proposal[1] == 1 and r._recheck
    check(single, "llumnix", arrivals=40)  # 100 arrivals after the counted win: confirmed
    assert r.within_stage == "llumnix" and r.describe()["replans"] == 1 and r._proposal is None and not r._recheck
    check(two, "least-loaded")  # stages ...
    check(PLAN, "llumnix")  # ... and other stages: the same evidence (stages beat pooled), the latest deployed
    assert r.plan == PLAN and r.within_stage == "llumnix" and r.describe()["replans"] == 2
    check(PLAN, "least-loaded")  # a policy flip at the same stages waits too
    check(PLAN, "llumnix")  # a check that keeps the deployed plan drops the proposal
    check(PLAN, "least-loaded")
    assert r.within_stage == "llumnix"
    check(two, "least-loaded", arrivals=0)  # fewer stages (toward pooled dispatch): at once
    assert r.plan == two and r.describe()["replans"] == 3
    r._fallback = (single, "least-loaded")  # the first plan from data: at once if pooled ...
    check(single, "llumnix", arrivals=0, urgent=True)
    assert r.plan == single and r.within_stage == "llumnix"
    check(PLAN, "llumnix", arrivals=0, urgent=True)  # ... stages are one win, the best pooled option runs
    assert r.plan == single and r.within_stage == "least-loaded" and r._proposal[1] == 1 and r._recheck
    check(two, "llumnix")  # confirmed on a fresh window
    assert r.plan == two and r._proposal is None
    eager = router(plan=single, confirm_checks=1)
    eager._deploy(two, "least-loaded")
    assert eager.plan == two
    big = router(plan=StagePlan.single(64, 16384), score_requests=100)
    assert big._scored_arrivals() == 400  # thinned to 16 scored replicas: a window reaches back 4x as far


def test_a_proposal_is_checked_again_only_once_its_window_is_fresh():
    from jaxinfer.router.cascade import _histogram
    from jaxinfer.router.partition import demand_from_requests

    single = StagePlan.single(5, 16384)
    r = router(plan=single, within_stage="auto", score_requests=50)
    sample = [(100 + k, 5) for k in range(60)]
    demand = demand_from_requests(sample, GRID, 60.0)
    r._reference_hist = _histogram(demand.decode, demand.arrivals)  # no drift: only the proposal calls a check
    checks = []
    r._choose_plan = lambda *args: checks.append(args) or (PLAN, "least-loaded")
    r._deploy(PLAN, "least-loaded")  # a first win, on the window of the arrivals so far (none)
    assert r.plan == single and r._recheck
    r._dispatched = 49
    r._maybe_replan(30.0, demand, sample, np.ones(60), 60.0)
    assert checks == [] and r.plan == single  # 49 arrivals since: its window would overlap the last one
    r._dispatched = 50
    r._maybe_replan(60.0, demand, sample, np.ones(60), 60.0)
    assert len(checks) == 1 and r.plan == PLAN and not r._recheck  # a fresh window won again: deployed


def test_a_change_must_also_hold_up_when_load_rises(monkeypatch):
    from jaxinfer.router.partition import demand_from_requests
    from jaxinfer.router.trace import TraceRequest

    replay = [TraceRequest(10.0 + k, 100 + k, 5) for k in range(60)]
    sample = [(q.prompt_len, q.output_len) for q in replay]
    args = (demand_from_requests(sample, GRID, 60.0), sample, np.ones(len(sample)), 1.0)

    def choose(stress_hurts_llumnix, **kw):
        r = router(score_requests=60, within_stage="auto", **kw)

        def score(plan, policy, requests, replicas):  # llumnix 20% faster at the window's rate
            under_stress = len(requests) == len(replay) and requests[-1].arrival < replay[-1].arrival - 1
            if policy == "llumnix":
                return (3.0, 9.0) if under_stress and stress_hurts_llumnix else (0.8, 2.4)
            return (1.0, 3.0) if plan.num_stages == 1 else (2.0, 6.0)
        monkeypatch.setattr(r, "_score", score)
        single = StagePlan.single(5, 16384)
        return r._choose_plan(*args, (single, "least-loaded"), replay), r.last_check

    (plan, policy), check = choose(stress_hurts_llumnix=False)
    assert policy == "llumnix" and all(len(c["mean_e2e"]) == 3 for c in check["candidates"])
    (plan, policy), _ = choose(stress_hurts_llumnix=True)  # better at the window's rate, worse at 1.25x: kept
    assert policy == "least-loaded" and plan.num_stages == 1
    (plan, policy), check = choose(stress_hurts_llumnix=True, stress_load=1.0)  # stress off: two parts
    assert policy == "llumnix" and all(len(c["mean_e2e"]) == 2 for c in check["candidates"])


def test_checks_for_infeasibility_alone_back_off(monkeypatch):
    # at overload every plan is infeasible: a check that keeps the plan doubles the wait before the next
    r = router(replan=True, replan_interval=1.0, window_seconds=5.0, min_replan_samples=50)
    r.set_plan(PLAN)
    monkeypatch.setattr(r, "_stage_costs", lambda demand: np.full((len(GRID),) * 2 + (6,), np.inf))
    times = []

    def keep(demand, sample, weights, rate, incumbent, replay=None, first=False):
        times.append(r._next_replan)
        return incumbent
    monkeypatch.setattr(r, "_choose_plan", keep)
    _feed_chats_then(r, drift=False)  # 12 s, a tick every 0.1 s
    gaps = np.diff(times)
    assert 3 <= len(times) <= 5 and all(b >= 1.9 * a for a, b in zip(gaps, gaps[1:], strict=False)), times


@pytest.mark.parametrize("llumnix, first, chosen", [((0.97, 3.0), False, "least-loaded"),
                                                     ((0.97, 3.0), True, "llumnix"),
                                                     ((0.97, 3.6), True, "least-loaded"),
                                                     ((0.99, 3.0), True, "least-loaded")])
def test_the_first_plan_from_data_takes_the_best_pooled_option_past_the_noise(monkeypatch, llumnix, first, chosen):
    # a live change must beat the deployed option by switch_gain (5%); the first plan from data keeps
    # nothing chosen from data: llumnix dispatch 3% faster is taken then, unless its P99 is past the
    # tolerance (20% worse) or it is within first_gain (1% faster: the default, least-loaded, stays)
    from jaxinfer.router.partition import demand_from_requests
    from jaxinfer.router.trace import TraceRequest

    replay = [TraceRequest(float(k), 100 + 50 * k, 5) for k in range(60)]
    sample = [(q.prompt_len, q.output_len) for q in replay]
    r = router(score_requests=60, within_stage="auto")

    def score(plan, policy, requests, replicas):
        if plan.num_stages > 1:
            return (2.0, 6.0)
        return llumnix if policy == "llumnix" else (1.0, 3.0)
    monkeypatch.setattr(r, "_score", score)
    plan, policy = r._choose_plan(demand_from_requests(sample, GRID, 60.0), sample, np.ones(60), 1.0,
                                  (StagePlan.single(5, 16384), "least-loaded"), replay, first=first)
    assert plan.num_stages == 1 and policy == chosen


@pytest.mark.parametrize("staged, chosen_stages", [((0.78, 2.3), 1), ((0.6, 1.8), "many")])
def test_stages_must_beat_the_best_pooled_option(monkeypatch, staged, chosen_stages):
    from jaxinfer.router.partition import demand_from_requests
    from jaxinfer.router.trace import TraceRequest

    replay = [TraceRequest(float(k), 100 + 50 * k, 5) for k in range(60)]
    sample = [(q.prompt_len, q.output_len) for q in replay]
    r = router(score_requests=60, within_stage="auto")

    def score(plan, policy, requests, replicas):  # llumnix dispatch 20% faster than least-loaded
        if plan.num_stages > 1:
            return staged
        return (0.8, 2.4) if policy == "llumnix" else (1.0, 3.0)
    monkeypatch.setattr(r, "_score", score)
    plan, policy = r._choose_plan(demand_from_requests(sample, GRID, 60.0), sample, np.ones(60), 1.0,
                                  (StagePlan.single(5, 16384), "least-loaded"), replay)
    # stages 2.5% faster than llumnix dispatch: not worth their risk; 25% faster: deployed
    assert (plan.num_stages == 1 and policy == "llumnix") if chosen_stages == 1 else plan.num_stages > 1


@pytest.mark.parametrize("field, value", [("first_gain", 1.0), ("first_gain", -0.1), ("decisive_gain", 1.0),
                                          ("stress_load", 0.5), ("audit_interval", -1.0)])
def test_config_names_a_bad_margin(field, value):
    from jaxinfer.router.cascade import CascadeConfig

    with pytest.raises(ValueError, match=field):
        CascadeConfig(**{field: value})
