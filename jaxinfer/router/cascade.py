"""The cascade router (CascadeInfer / L4): replicas form a chain of length-specialised stages
(pure Python + numpy, no jax).

- A stage owns a contiguous range of context lengths and a consecutive block of replicas; a new
  request goes to a replica (by the within-stage policy below) of the stage that owns its prompt length.
- Context only grows, so a running request that outgrows its stage (by a slack) is handed off
  downstream to the stage that owns its length; it never moves upstream.
- Within a stage, a policy: ``least-loaded`` (the lowest virtual KV usage, then the shorter queue)
  or ``llumnix`` (the freest replica by free pages per request, and balancing migrations:
  jaxinfer.router.balance). ``within_stage`` "auto" lets the plan check choose; the one-stage plan
  is then exactly the least-loaded or the llumnix baseline.
- Observed demand: the requests finished in the last ``window_seconds`` (reaching back further
  while that holds fewer than ``score_requests`` arrivals: at a low rate a minute of requests is
  too few to judge a plan by), re-weighted per prompt bucket to that window's arrivals (see
  ``_window_sample``).
- Range refinement (§3.3), every ``refine_interval``, one step at a time. Measured load first: a
  stage whose smoothed pressure (virtual KV usage plus queue share) exceeds its neighbour's by
  ``load_gap`` gets their boundary moved one grid step toward it, by ``replica_gap`` the
  neighbour's nearest replica. Otherwise the model: a boundary moves when that lowers its two
  stages' modelled cost under the observed demand by more than ``refine_eps`` (relative; or makes
  an infeasible pair feasible). Either needs ``refine_persist`` consecutive checks. Hysteresis:
  undoing the boundary's last move needs twice the threshold and freezes it for
  ``refine_interval * 2**reversals``, for good after ``max_reversals``, so it settles on a
  stationary load.
- Re-plan, every ``replan_interval``, when the length histogram drifted (KL divergence from the one
  the plan was fit to above ``replan_kl``) or the current stages are infeasible under the observed
  demand: the DP proposes candidates (its optimum, with a per-stage penalty, at half and double the
  load) beside the one-stage plan, each with least-loaded (and some with llumnix) stages, is
  simulated on the window's requests replayed as they arrived (each half apart, and all of them
  ``stress_load`` times faster), and the best is deployed if it beats the deployed plan by
  ``switch_gain`` on mean E2E, is no worse on any part's mean (P99: within ``p99_tolerance``), and won
  ``confirm_checks`` consecutive checks on disjoint windows (each scored on arrivals the one before
  had not seen; with ``background``, chosen on a worker thread). The first plan from data is
  deployed at once if it has one stage or its stages beat the best pooled option by ``decisive_gain``
  (20%) on that window; other stages chosen on a first window are one win, and the best pooled
  option runs until a check on fresh arrivals confirms them. Which pooled option: the default
  (least-loaded) unless another beats it by ``first_gain`` (2%: nothing chosen from data is
  deployed yet, so no hysteresis, only a band for the window's noise).
- Audits, every ``audit_interval`` once a fresh window has arrived (none of its scored arrivals seen
  by the last check): a check although nothing drifted, under a live change's rules, so a plan
  that was wrong from the start (an operator's, or a first plan from a misleading window) is found
  on a stationary load too.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from jaxinfer.router.balance import balance_moves, freeness
from jaxinfer.router.base import Migration, NewRequest, ReplicaLoad, RequestLoad, Router, accepting
from jaxinfer.router.cost_model import CostModel
from jaxinfer.router.partition import (
    Demand,
    QoE,
    StagePlan,
    default_grid,
    demand_from_requests,
    mean_e2e_qoe,
    partition,
    stage_costs,
)
from jaxinfer.router.sim import Simulator
from jaxinfer.router.trace import TraceRequest, cap_lengths, scale_rate

logger = logging.getLogger(__name__)

_MAX_HISTORY = 50_000  # length samples kept for re-planning
WITHIN_STAGE = ("least-loaded", "llumnix")  # dispatch (and balancing) policies inside a stage


@dataclasses.dataclass(frozen=True, slots=True)
class CascadeConfig:
    interval: float = 0.1  # seconds between rebalance calls
    slack_fraction: float = 0.04  # hand off at context >= hi + max(page, slack_fraction * hi)
    handoff_usage_cap: float = 0.9  # a hand-off destination's KV usage must stay below this
    max_concurrent: int = 4  # migrations in flight per replica (in or out): every long request crosses stages
    within_stage: str = "auto"  # least-loaded, llumnix, or auto (the plan check chooses)
    balance_gap_pages: float = 3.0  # freeness gap (free pages per request) a balancing pair must exceed
    refine_interval: float = 2.0
    refine_eps: float = 0.05  # relative drop of the two stages' modelled cost that moves a boundary
    refine_persist: int = 2  # consecutive imbalanced checks before a move
    load_gap: float = 0.15  # measured pressure gap between neighbouring stages that moves their boundary
    replica_gap: float = 0.4  # ... that moves a replica from the cooler stage to the hotter one
    max_reversals: int = 2  # a boundary that undid its last move this often stays until the next re-plan
    replan_interval: float = 30.0
    window_seconds: float = 60.0  # length history the re-plan is fit to (at least score_requests arrivals)
    replan_kl: float = 0.25  # histogram drift (KL divergence, nats) that triggers the DP
    min_replan_samples: int = 200  # finished requests in the window before refining or re-planning
    max_utilisation: float = 0.9  # DP feasibility cap
    check_plans: bool = True  # score the DP's candidates and the deployed plan in the simulator, deploy the best
    score_requests: int = 800  # requests each candidate is simulated on
    score_replicas: int = 16  # candidates run on a cluster of at most this many replicas (stages and rate scaled)
    switch_gain: float = 0.05  # a new plan must beat the deployed one's simulated score by this (relative)
    p99_tolerance: float = 0.1  # a change may be this much worse (relative) on P99 over the scored parts
    stress_load: float = 1.25  # candidates are also scored on the window replayed this much faster (1: off)
    confirm_checks: int = 2  # consecutive checks a live re-plan must win before it is deployed
    decisive_gain: float = 0.2  # stages this much better than pooled on the first window: deployed at once
    first_gain: float = 0.02  # on the first window another one-stage option replaces the default if this much better
    audit_interval: float = 600.0  # seconds between checks of a plan nothing drifted from (0: no audits)

    def __post_init__(self):
        for name in ("interval", "refine_interval", "replan_interval", "window_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CascadeConfig.{name} must be positive, got {getattr(self, name)}")
        if self.score_requests < 10 or self.score_replicas < 1 or self.switch_gain < 0:
            raise ValueError(f"need score_requests >= 10, score_replicas >= 1, switch_gain >= 0, got "
                             f"{self.score_requests}, {self.score_replicas}, {self.switch_gain}")
        if self.max_concurrent < 1 or self.refine_persist < 1 or self.confirm_checks < 1:
            raise ValueError(f"max_concurrent, refine_persist and confirm_checks must be >= 1, got "
                             f"{self.max_concurrent}, {self.refine_persist}, {self.confirm_checks}")
        if not (self.stress_load >= 1 and self.p99_tolerance >= 0 and 0 <= self.decisive_gain < 1
                and 0 <= self.first_gain < 1):
            raise ValueError(f"need stress_load >= 1, p99_tolerance >= 0, 0 <= decisive_gain < 1 and 0 <= first_gain "
                             f"< 1, got {self.stress_load}, {self.p99_tolerance}, {self.decisive_gain}, "
                             f"{self.first_gain}")
        if not self.audit_interval >= 0:
            raise ValueError(f"CascadeConfig.audit_interval must be >= 0 (0: off), got {self.audit_interval}")
        if not 0 < self.load_gap <= self.replica_gap:
            raise ValueError(f"need 0 < load_gap <= replica_gap, got {self.load_gap}, {self.replica_gap}")
        if not (0 <= self.slack_fraction < 1 and self.balance_gap_pages >= 0 and self.refine_eps >= 0):
            raise ValueError(f"need 0 <= slack_fraction < 1, balance_gap_pages >= 0, refine_eps >= 0, got "
                             f"{self.slack_fraction}, {self.balance_gap_pages}, {self.refine_eps}")
        if self.within_stage not in ("auto", *WITHIN_STAGE):
            raise ValueError(f"within_stage must be auto, {' or '.join(WITHIN_STAGE)}, got {self.within_stage!r}")


class CascadeRouter(Router):
    name = "cascade"

    def __init__(self, num_replicas: int, cost_model: CostModel, max_len: int, *, plan: StagePlan | None = None,
                 grid: Sequence[int] | None = None, sample: Sequence[tuple] | None = None,
                 sample_window_seconds: float | None = None, qoe: QoE = mean_e2e_qoe, refine: bool = True,
                 replan: bool = True, background: bool = False, config: CascadeConfig | None = None,
                 **overrides):
        """plan: the initial stages (None: the checked plan for ``sample``, (prompt, output) lengths or
        (arrival, prompt, output) requests, observed over ``sample_window_seconds``; without a window
        the DP's at the rate that loads the cluster about half; without a sample, on a default mix).
        grid: candidate boundaries (0 ... max_len).
        background: choose re-plans on a worker thread (a live cluster, whose router loop must not
        stall while candidates are simulated); the simulator keeps it off, deterministic.
        overrides: CascadeConfig fields."""
        if num_replicas < 1 or max_len < 2:
            raise ValueError(f"need num_replicas >= 1 and max_len >= 2, got {num_replicas}, {max_len}")
        self.config = dataclasses.replace(config or CascadeConfig(), **overrides)
        self.interval = self.config.interval
        self.num_replicas, self.cost_model, self.max_len, self.qoe = num_replicas, cost_model, max_len, qoe
        self._members = list(range(num_replicas))  # the replicas up: plans number these consecutively
        self.refine_enabled, self.replan_enabled = refine, replan
        self.grid = tuple(int(g) for g in grid) if grid is not None else default_grid(
            max_len, page_size=cost_model.page_size)
        self._grid_index = {g: i for i, g in enumerate(self.grid)}
        g = self.grid
        if g[0] != 0 or g[-1] != max_len or any(y <= x for x, y in zip(g, g[1:], strict=False)):
            raise ValueError(f"grid must go strictly up from 0 to max_len={max_len}, got {list(self.grid)}")
        self.num_refinements = self.num_replans = self.num_handoffs = self.num_balances = self.num_replica_moves = 0
        self._finished: deque[tuple[float, int, int]] = deque()  # (time, prompt, output) of finished requests
        self._arrivals: deque[tuple[float, int, str]] = deque()  # (time, prompt, id) of dispatched requests
        self._outputs: dict[str, int] = {}  # output length of the finished requests among the arrivals
        self._next_refine = self.config.refine_interval
        self._pressure: dict[int, float] = {}  # per replica: smoothed KV usage (used + queued) plus queue share
        self._next_replan = self.config.replan_interval
        self._reference_hist: np.ndarray | None = None
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._job: Future | None = None  # a re-plan being chosen on the worker thread: _deploy's arguments
        # a change checks chose: (its key, consecutive wins on disjoint windows, arrivals when it last won)
        self._proposal: tuple[tuple, int, int] | None = None
        self._recheck = False  # check again once the window is fresh (a proposal waits for confirmation)
        self._dispatched = self._checked_at = 0  # arrivals so far; ... when the last check's window was taken
        # the last check's best pooled option (None: its pick was decisive, no fallback)
        self._fallback: tuple[StagePlan, str] | None = None
        self._infeasible_checks, self._next_infeasible_check = 0, 0.0  # checks for infeasibility alone: backoff
        self._next_audit = self.config.audit_interval  # no check of an undrifted plan before this
        self.num_audits = 0
        self.num_checks, self.check_seconds = 0, 0.0  # plan checks run, and their time
        self.last_check: dict = {}  # the last plan check: candidates' scores, the pick, seconds
        self.within_stage = self._unchecked_policy(plan)
        if plan is None:
            plan, self.within_stage = self._initial_plan(sample, sample_window_seconds)
            self._replan_on_data = sample is None  # a default plan is replaced once data arrives
        elif plan.num_replicas != num_replicas or plan.max_len != max_len:
            raise ValueError(f"the plan covers {plan.num_replicas} replicas up to {plan.max_len} tokens, the "
                             f"router {num_replicas} up to max_len={max_len}")
        else:
            self._replan_on_data = False
        self._apply_plan(plan)

    # ---- plan state ---------------------------------------------------------------------------------

    def _unchecked_policy(self, plan: StagePlan | None) -> str:
        """The within-stage policy of a plan no check chose: as configured, or under auto balancing
        stages (the paper's design) and least-loaded dispatch for a single stage."""
        if self.config.within_stage != "auto":
            return self.config.within_stage
        return "llumnix" if plan is not None and plan.num_stages > 1 else "least-loaded"

    def _initial_plan(self, sample, window) -> tuple[StagePlan, str]:
        """The first plan and its within-stage policy."""
        if sample is None:
            rng = np.random.default_rng(0)
            prompts = np.minimum(rng.lognormal(math.log(min(1024, self.max_len // 4)), 1.0, 2000), self.max_len // 2)
            outputs = np.minimum(rng.lognormal(math.log(256), 0.8, 2000), self.max_len // 2)
            sample = list(zip(np.maximum(prompts, 1).astype(int).tolist(), np.maximum(outputs, 1).astype(int).tolist(),
                              strict=True))
        replay = None
        if sample and len(sample[0]) == 3:  # (arrival, prompt, output): replayed as they came
            replay = [TraceRequest(float(t), max(int(p), 1), max(int(o), 1)) for t, p, o in sample]
            sample = [(r.prompt_len, r.output_len) for r in replay]
        sample = [(int(p), int(o)) for p, o in sample]
        if not sample:
            plan = StagePlan.single(self.num_replicas, self.max_len)
            return plan, self._unchecked_policy(plan)
        observed = window is not None  # a sample without its window (or the default mix): the DP alone
        if not observed:
            window = self._work_seconds(sample) / (0.5 * self.num_replicas)
        demand = demand_from_requests(sample, self.grid, window)
        self._reference_hist = _histogram(demand.decode, demand.arrivals)
        if not observed:
            plan = self._dp(demand)
            return plan, self._unchecked_policy(plan)
        return self._first_plan(*self._choose_plan(demand, sample, np.ones(len(sample)), len(sample) / window, None,
                                                   replay, first=True))

    def _work_seconds(self, sample) -> float:
        """Replica-seconds the sample needs: decode rows at their context (no step overhead) and prefill."""
        _, b, c = self.cost_model.decode_fit()
        pa, pb, pc = self.cost_model.prefill_fit()
        p, o = np.asarray(sample, float).T
        chunks = np.ceil(p / self.cost_model.max_num_batched_tokens)
        return float(np.sum(o * (b + c * (p + o / 2)) + chunks * pa + pb * p + pc * p * p / 2)) or 1.0

    def _dp(self, demand: Demand, stage_penalty: float = 0.0) -> StagePlan:
        return partition(demand, self.grid, self.num_replicas, self.cost_model, qoe=self.qoe,
                         max_utilisation=self.config.max_utilisation, stage_penalty=stage_penalty)

    def _apply_plan(self, plan: StagePlan) -> None:
        self.plan = plan
        self.boundaries = list(plan.boundaries)
        self._stage_members = [[self._members[k] for k in plan.replicas_of(s)] for s in range(plan.num_stages)]
        self._replica_stage = {r: s for s, members in enumerate(self._stage_members) for r in members}
        self._reset_refinement()

    def _reset_refinement(self) -> None:
        n = len(self.boundaries)
        self._pending = [(0, 0)] * n  # per boundary: (sign of imbalance, consecutive checks)
        self._last_move = [0] * n
        self._reversals = [0] * n  # moves that undid the previous one: each doubles the wait before the next
        self._frozen_until = [0.0] * n

    @property
    def num_stages(self) -> int:
        return len(self._stage_members)

    def stage_of(self, length: int) -> int:
        """The stage whose current range holds ``length`` (past the last boundary: the last stage)."""
        return min(bisect.bisect_right(self.boundaries, length) - 1, self.num_stages - 1)

    def stage_of_replica(self, replica: int) -> int | None:
        return self._replica_stage.get(replica)

    def set_boundaries(self, boundaries: Sequence[int]) -> None:
        """Admin API: new length ranges for the current stages (0 = b0 < ... < bS = max_len)."""
        b = list(boundaries)
        if len(b) != self.num_stages + 1:
            raise ValueError(f"{self.num_stages} stages need {self.num_stages + 1} boundaries, got {len(b)}")
        if any(isinstance(x, bool) or not isinstance(x, int | np.integer) for x in b):
            raise ValueError(f"boundaries must be integers, got {b}")
        if b[0] != 0 or b[-1] != self.max_len or any(y <= x for x, y in zip(b, b[1:], strict=False)):
            raise ValueError(f"boundaries must go strictly up from 0 to max_len={self.max_len}, got {b}")
        self.boundaries = [int(x) for x in b]
        self._reset_refinement()

    def set_plan(self, plan: StagePlan | dict) -> None:
        """Admin API: new stages and replica counts (a StagePlan or {"boundaries", "replica_counts"})."""
        if isinstance(plan, dict):
            if "boundaries" not in plan or "replica_counts" not in plan:
                raise ValueError("a plan needs 'boundaries' and 'replica_counts'")
            plan = StagePlan(tuple(plan["boundaries"]), tuple(plan["replica_counts"]))
        if plan.num_replicas != self.num_replicas:
            raise ValueError(f"the plan has {plan.num_replicas} replicas, the cluster {self.num_replicas} up")
        if plan.max_len != self.max_len:
            raise ValueError(f"the plan's last boundary {plan.max_len} is not max_len={self.max_len}")
        self._apply_plan(plan)
        self._replan_on_data = False
        self._reference_hist = None  # the next check takes the observed histogram as reference

    def set_members(self, replicas: Sequence[int]) -> None:
        """Replicas were lost or came back: the current stages keep their ranges with replica counts
        scaled to those up (one stage if there are fewer replicas than stages), and a checked re-plan
        follows once the window has enough requests."""
        members = sorted({int(r) for r in replicas})
        if not members or members == self._members:
            return
        logger.info("replicas up: %s (were %s)", members, self._members)
        self._members, self.num_replicas = members, len(members)
        counts = self.plan.replica_counts
        plan = StagePlan(tuple(self.boundaries), _scaled_counts(counts, len(members))) \
            if len(members) >= len(counts) else StagePlan.single(len(members), self.max_len)
        self._apply_plan(plan)
        self._replan_on_data = True

    def describe(self) -> dict:
        stages = [{"lo": self.boundaries[s], "hi": self.boundaries[s + 1], "replicas": list(members)}
                  for s, members in enumerate(self._stage_members)]
        return {"router": self.name, "stages": stages, "refinements": self.num_refinements,
                "replans": self.num_replans, "handoffs": self.num_handoffs, "within_stage": self.within_stage,
                "balances": self.num_balances,
                "replica_moves": self.num_replica_moves, "stage_pressure": self.stage_pressure(),
                "checks": self.num_checks, "audits": self.num_audits, "check_seconds": self.check_seconds,
                "last_check": self.last_check}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---- decisions ------------------------------------------------------------------------------------

    def dispatch(self, request: NewRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        live = accepting(replicas)
        by_stage: dict[int, list[ReplicaLoad]] = {}
        for r in live:
            s = self._replica_stage.get(r.replica)
            if s is not None:
                by_stage.setdefault(s, []).append(r)
        if not by_stage:
            return self._pick(live)
        self._arrivals.append((now, request.prompt_len, request.request_id))
        self._dispatched += 1
        if len(self._arrivals) > _MAX_HISTORY:
            self._outputs.pop(self._arrivals.popleft()[2], None)
        home = self.stage_of(request.prompt_len)
        for distance in range(self.num_stages):
            for s in (home + distance, home - distance):  # at equal distance downstream first
                if s in by_stage:
                    return self._pick(by_stage[s])
        raise AssertionError("unreachable: some stage has a live replica")

    def _pick(self, replicas: list[ReplicaLoad]) -> int:
        if self.within_stage == "llumnix":
            return max(replicas, key=lambda r: (freeness(r), -r.replica)).replica
        return min(replicas, key=_load_key).replica

    def on_finish(self, request_id: str, prompt_len: int, output_len: int, now: float) -> None:
        self._finished.append((now, prompt_len, output_len))
        self._outputs[request_id] = output_len
        if len(self._finished) > _MAX_HISTORY:
            self._finished.popleft()

    def rebalance(self, replicas: Sequence[ReplicaLoad], now: float) -> list[Migration]:
        if self._job is not None and self._job.done():
            job, self._job = self._job, None
            self._deploy(*job.result())
        mine = {r.replica: r for r in replicas if r.replica in self._replica_stage}
        self._observe(mine)
        warm = self._replan_on_data and len(self._finished) >= self.config.min_replan_samples
        replan = self.replan_enabled and (now >= self._next_replan or warm)
        refine = self.refine_enabled and now >= self._next_refine
        if replan or refine:
            demand = self._window_demand(now)
            if replan:
                self._next_replan = now + self.config.replan_interval
                if demand is not None:
                    self._maybe_replan(now, *demand)
            if refine:
                self._next_refine = now + self.config.refine_interval
                self._refine(now, demand[0] if demand is not None else None)
        in_flight = {i: r.migrations_in_flight for i, r in mine.items()}
        usage = {i: r.usage for i, r in mine.items()}
        moved: set[str] = set()
        orders = self._handoffs(mine, in_flight, usage, moved)
        orders += self._balance(mine, in_flight, usage, moved)
        self.num_handoffs += sum(o.reason == "handoff" for o in orders)
        self.num_balances += sum(o.reason == "balance" for o in orders)
        return orders

    def _handoffs(self, mine, in_flight, usage, moved) -> list[Migration]:
        cfg, orders = self.config, []
        # Within a tick destinations only fill up, so a stage that had no room for a request of c
        # tokens has none for any request at least that long.
        no_room: dict[int, int] = {}
        for i, src in mine.items():
            s = self._replica_stage[i]
            if s == self.num_stages - 1 or in_flight[i] >= cfg.max_concurrent:
                continue
            hi = self.boundaries[s + 1]
            limit = hi + max(src.page_size, int(cfg.slack_fraction * hi))
            due = sorted((r for r in src.requests if r.running and not r.migrating and r.context_len >= limit),
                         key=lambda r: -r.context_len)
            for req in due:
                if in_flight[i] >= cfg.max_concurrent:
                    break
                target = self.stage_of(req.context_len)
                if target <= s or req.context_len >= no_room.get(target, math.inf):
                    continue
                dst = self._handoff_destination(target, req, mine, in_flight, usage)
                if dst is None:
                    no_room[target] = min(req.context_len, no_room.get(target, math.inf))
                    continue
                orders.append(Migration(req.request_id, i, dst, "handoff"))
                self._account(req, mine[i], mine[dst], in_flight, usage, moved)
        return orders

    def _handoff_destination(self, stage: int, req: RequestLoad, mine, in_flight, usage) -> int | None:
        """The least-loaded live replica of ``stage`` with a migration slot and room below the cap."""
        best, best_key, cap, limit = None, None, self.config.handoff_usage_cap, self.config.max_concurrent
        for d in self._stage_members[stage]:
            rep = mine.get(d)
            if rep is None or not rep.accepting or in_flight[d] >= limit:
                continue
            u = usage[d]
            if u + _pages(req, rep) / max(rep.kv_pages_total, 1) >= cap:
                continue
            key = (u, len(rep.requests), d)
            if best_key is None or key < best_key:
                best, best_key = d, key
        return best

    def _balance(self, mine, in_flight, usage, moved) -> list[Migration]:
        """Balancing moves within each stage, among its replicas with no move in flight (this tick's
        hand-offs included)."""
        orders = []
        if self.within_stage != "llumnix":
            return orders
        for members in self._stage_members:
            free = [mine[i] for i in members if i in mine and mine[i].accepting and in_flight[i] == 0]
            for order in balance_moves(free, self.config.balance_gap_pages, skip=moved):
                src, dst = mine[order.src], mine[order.dst]
                req = next(r for r in src.requests if r.request_id == order.request_id)
                orders.append(order)
                self._account(req, src, dst, in_flight, usage, moved)
        return orders

    @staticmethod
    def _account(req, src, dst, in_flight, usage, moved) -> None:
        """Count an order against this tick's view so later decisions see it."""
        in_flight[src.replica] += 1
        in_flight[dst.replica] += 1
        usage[src.replica] -= _pages(req, src) / max(src.kv_pages_total, 1)
        usage[dst.replica] += _pages(req, dst) / max(dst.kv_pages_total, 1)
        moved.add(req.request_id)

    # ---- range refinement and re-planning ------------------------------------------------------------

    def _window_demand(self, now: float) -> tuple[Demand, list, np.ndarray, float] | None:
        """The demand of the last ``window_seconds``, or of the last ``score_requests`` arrivals where
        those reach back further (None with too few finished requests), with the sample, weights and
        window it came from."""
        cfg = self.config
        while len(self._finished) > cfg.score_requests and self._finished[0][0] < now - cfg.window_seconds:
            self._finished.popleft()
        while len(self._arrivals) > cfg.score_requests and self._arrivals[0][0] < now - cfg.window_seconds:
            self._outputs.pop(self._arrivals.popleft()[2], None)
        if len(self._finished) < cfg.min_replan_samples or not self._arrivals:
            return None
        sample, weights = self._window_sample()
        window = max(now - self._arrivals[0][0], cfg.interval)
        return demand_from_requests(sample, self.grid, window, weights), sample, weights, window

    def _stage_costs(self, demand: Demand) -> np.ndarray:
        return stage_costs(demand, self.grid, self.num_replicas, self.cost_model, qoe=self.qoe,
                           max_utilisation=self.config.max_utilisation)

    def _observe(self, mine: dict[int, ReplicaLoad]) -> None:
        """Smooth each replica's measured pressure: its virtual KV usage (held plus queued pages over
        the pool) plus its queue over ``max_num_seqs``, averaged over about ``refine_interval``."""
        keep = min(1.0, self.config.interval / self.config.refine_interval)
        for i, r in mine.items():
            now = r.usage + r.num_waiting / self.cost_model.max_num_seqs
            self._pressure[i] = self._pressure.get(i, now) * (1 - keep) + now * keep

    def stage_pressure(self) -> list[float]:
        """Per stage, its replicas' mean smoothed pressure (0 for a stage not yet observed)."""
        return [float(np.mean([self._pressure.get(i, 0.0) for i in members])) for members in self._stage_members]

    def _refine(self, now: float, demand: Demand | None) -> None:
        """Move stage boundaries (and replicas) one step at a time, replica counts otherwise fixed.
        Measured load first: when a stage's pressure exceeds its neighbour's by ``load_gap``, their
        boundary moves one grid step toward the hot stage (its range shrinks); by ``replica_gap``, the
        neighbour's nearest replica joins it instead (the neighbour keeping one). Otherwise the model:
        a boundary moves when that lowers its two stages' modelled cost under the observed demand
        by more than ``refine_eps`` (relative). Either needs ``refine_persist`` consecutive checks."""
        index = [self._grid_index.get(b) for b in self.boundaries]
        if None in index:
            return  # an operator's off-grid boundaries: left alone
        cfg = self.config
        q = self._stage_costs(demand) if demand is not None else None
        counts = [len(m) for m in self._stage_members]
        pressure = self.stage_pressure()
        for b in range(1, self.num_stages):
            lo, cur, hi = index[b - 1], index[b], index[b + 1]
            gap = pressure[b - 1] - pressure[b]  # > 0: the stage below the boundary is the hotter one
            action = "boundary"
            if abs(gap) > cfg.load_gap:  # measured: relieve the hot side (-1: the lower stage, +1: the upper)
                sign = -1 if gap > 0 else 1
                cold = b if sign < 0 else b - 1
                if abs(gap) > cfg.replica_gap and counts[cold] > 1:
                    action = "replica"
                elif not lo < cur + sign < hi:
                    sign = 0
                gain = abs(gap)
                strong = abs(gap) > 2 * cfg.load_gap
            elif q is not None:
                def pair(i, lo=lo, hi=hi, b=b, counts=counts):
                    return q[lo, i, counts[b - 1]] + q[i, hi, counts[b]]

                options = [(pair(i), i) for i in (cur - 1, cur + 1) if lo < i < hi]
                best_cost, best = min(options) if options else (math.inf, cur)
                now_cost = pair(cur)
                if math.isinf(now_cost):
                    gain = math.inf if math.isfinite(best_cost) else 0.0
                else:
                    gain = (now_cost - best_cost) / max(now_cost, 1e-12)
                sign = (1 if best > cur else -1) if gain > cfg.refine_eps else 0
                strong = gain > 2 * cfg.refine_eps
            else:
                sign, strong = 0, False
            prev_sign, count = self._pending[b]
            count = count + 1 if sign and sign == prev_sign else int(sign != 0)
            self._pending[b] = (sign, count)
            if count < cfg.refine_persist:
                continue
            undo = self._last_move[b] == -sign
            if now < self._frozen_until[b] or (undo and not strong):
                continue  # backing off, or would undo the last move without a clear gain
            if undo:
                self._reversals[b] += 1
                self._frozen_until[b] = now + cfg.refine_interval * 2 ** self._reversals[b]
                if self._reversals[b] >= cfg.max_reversals:
                    self._frozen_until[b] = math.inf  # dithering between two steps: stay
            if action == "replica":
                self._move_replica(b, sign)
                counts = [len(m) for m in self._stage_members]
            else:
                logger.debug("boundary %d: %d -> %d (gain %.3f)", b, self.boundaries[b], self.grid[cur + sign], gain)
                index[b] = cur + sign
                self.boundaries[b] = self.grid[cur + sign]
            self._last_move[b] = sign
            self._pending[b] = (0, 0)
            self.num_refinements += 1

    def _move_replica(self, b: int, sign: int) -> None:
        """Boundary ``b``'s nearest replica of the cooler stage joins the hotter one (sign -1: the
        upper stage's first replica joins the lower stage; +1: the lower stage's last joins the
        upper). Its requests stay; those past its new stage's range are handed off as usual."""
        lower, upper = self._stage_members[b - 1], self._stage_members[b]
        if sign < 0:
            lower.append(upper.pop(0))
            self._replica_stage[lower[-1]] = b - 1
        else:
            upper.insert(0, lower.pop())
            self._replica_stage[upper[0]] = b
        logger.debug("replica moves across boundary %d (%s)", b, "down" if sign < 0 else "up")
        self.plan = StagePlan(tuple(self.boundaries), tuple(len(m) for m in self._stage_members))
        self.num_replica_moves += 1

    def _maybe_replan(self, now: float, demand: Demand, sample, weights, window: float) -> None:
        """Check plans when the length histogram drifted, a proposal awaits confirmation, or the
        current stages are infeasible under the observed demand (at overload every plan is: such
        checks back off, each that kept the plan doubling the wait before the next)."""
        hist = _histogram(demand.decode, demand.arrivals)
        if self._reference_hist is None and not self._replan_on_data:
            self._reference_hist = hist  # an operator's plan: observe, re-plan only on later drift
            return
        drift = math.inf if self._reference_hist is None else _kl(hist, self._reference_hist)
        index = [self._grid_index.get(b) for b in self.boundaries]
        infeasible = None not in index and math.isinf(sum(
            self._stage_costs(demand)[index[s], index[s + 1], len(m)] for s, m in enumerate(self._stage_members)))
        if self._job is not None:
            return  # a re-plan is being chosen
        recheck = self._recheck and self._dispatched - self._proposal[2] >= self._scored_arrivals()
        called = self._replan_on_data or drift > self.config.replan_kl or recheck
        audit = (not called and self.config.audit_interval > 0 and now >= self._next_audit
                 and self._dispatched - self._checked_at >= self._scored_arrivals())  # nothing else called it
        if not (called or audit):
            if not infeasible or now < self._next_infeasible_check:
                return
            self._next_infeasible_check = now + self.config.replan_interval * 2 ** min(self._infeasible_checks, 5)
            self._infeasible_checks += 1
        urgent = self._replan_on_data  # the first plan from data: deployed at once
        self.num_audits += audit
        self._replan_on_data = False
        self._checked_at = self._dispatched
        self._next_audit = now + self.config.audit_interval
        self._reference_hist = hist
        logger.info("re-plan check (drift %.3f, infeasible %s, audit %s)", drift, infeasible, audit)
        incumbent = StagePlan(tuple(self.boundaries), self.plan.replica_counts), self.within_stage
        rate = len(self._arrivals) / window
        args = (demand, sample, weights, rate, incumbent, self._window_replay(sample, weights), urgent)
        if self.background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-replan")
            self._job = self._executor.submit(lambda: (*self._choose_plan(*args), urgent))
        else:
            self._deploy(*self._choose_plan(*args), urgent=urgent)

    def _deploy(self, plan: StagePlan, within_stage: str, urgent: bool = False) -> None:
        """Deploy a checked plan. A live change to as many stages or more (not ``urgent``) must first
        win ``confirm_checks`` consecutive checks on disjoint windows (a win on a window that overlaps the
        last win's scored arrivals leaves the count as it was; any multi-stage plans count as one
        proposal: the DP's boundaries and the policy's edge move with the window, the evidence is that
        stages beat pooled dispatch; the latest is deployed): one window's bursts do not flip the plan,
        nor does the same evidence counted twice. A change to fewer stages (toward pooled dispatch, the
        safe side) is deployed at once; the first plan from data (``urgent``) as ``_first_plan`` says."""
        if plan.num_replicas != self.num_replicas:  # chosen before replicas were lost or came back
            self._replan_on_data = True
            return
        if urgent:
            plan, within_stage = self._first_plan(plan, within_stage)
        else:
            if self._is_change(plan, within_stage) and plan.num_stages >= self.num_stages:
                key = (plan.boundaries, plan.replica_counts, within_stage)
                if self._proposal is None or not _same_proposal(self._proposal[0], key):
                    self._proposal = (key, 1, self._checked_at)
                elif self._checked_at - self._proposal[2] >= self._scored_arrivals():
                    self._proposal = (key, self._proposal[1] + 1, self._checked_at)
                if self._proposal[1] < self.config.confirm_checks:
                    self._recheck = True
                    return
            self._proposal, self._recheck = None, False
        changed = plan.boundaries != tuple(self.boundaries) or plan.replica_counts != self.plan.replica_counts
        self._reset_refinement()
        if changed or within_stage != self.within_stage:
            self._infeasible_checks = 0
            logger.info("re-plan: %s x %s, %s within stages", plan.boundaries, plan.replica_counts, within_stage)
            self.within_stage = within_stage
            self.num_replans += 1
        if changed:
            self._apply_plan(plan)

    def _first_plan(self, plan: StagePlan, within_stage: str) -> tuple[StagePlan, str]:
        """What runs of the first plan from data: itself if it has one stage or its stages beat the best
        pooled option by ``decisive_gain`` (the check left no fallback); else the best pooled option,
        the stages proposed with one win, to be confirmed on fresh arrivals."""
        if plan.num_stages > 1 and self._fallback is not None:
            self._proposal = ((plan.boundaries, plan.replica_counts, within_stage), 1, self._checked_at)
            self._recheck = True
            return self._fallback
        self._proposal, self._recheck = None, False
        return plan, within_stage

    def _is_change(self, plan: StagePlan, within_stage: str) -> bool:
        return (plan.boundaries != tuple(self.boundaries) or plan.replica_counts != self.plan.replica_counts
                or within_stage != self.within_stage)

    # ---- checked plans ---------------------------------------------------------------------------------

    def _scored_arrivals(self) -> int:
        """Arrivals a check's scored requests reach back over (the last ``score_requests``, thinned to
        ``score_replicas`` on a larger cluster): a check after this many more sees none of them again."""
        n = self.config.score_requests
        return n if self.num_replicas <= self.config.score_replicas else math.ceil(
            n * self.num_replicas / self.config.score_replicas)

    def _candidates(self, demand: Demand) -> list[StagePlan]:
        """The DP's optimum, its optima with a per-stage penalty (fewer stages) and at lower and higher
        load (plans that hold up when the rate moves), and the one-stage plan (least-loaded dispatch)."""
        best = self._dp(demand)
        plans = [best]
        if math.isfinite(best.cost) and best.cost > 0:
            plans += [self._dp(demand, share * best.cost) for share in (0.05, 0.25, 1.0)]
        plans += [self._dp(demand.scaled(f)) for f in (0.5, 2.0)]
        plans.append(StagePlan.single(self.num_replicas, self.max_len))
        return plans

    def _choose_plan(self, demand: Demand, sample, weights, rate: float, incumbent: tuple[StagePlan, str] | None,
                     replay: list[TraceRequest] | None = None, first: bool = False) -> tuple[StagePlan, str]:
        """The plan to deploy and its within-stage policy: without checks the DP's optimum; with them,
        the candidate (the deployed one among them) with the best simulated latency on the window's
        requests replayed as they arrived (``replay``; else requests drawn from its length mix with
        Poisson arrivals at its rate), scored by the geometric mean of its mean E2E on each half of
        them and on all of them at ``stress_load`` times the rate (its P99 likewise, as a guard).
        Under ``within_stage`` auto every plan is scored with least-loaded stages, the DP's optimum
        and the one-stage plan also with llumnix stages. A change must be no worse than the deployed
        plan (without one, the one-stage least-loaded plan, i.e. least-loaded dispatch) on mean in any
        of these, nor on P99 (over the three) by more than ``p99_tolerance``, and beat its score by
        ``switch_gain``. For the ``first`` plan from data nothing deployed was chosen from data: the
        reference is the best-scored one-stage option that beats the default by ``first_gain`` (a
        band for a window's noise, not the hysteresis of a live change) within ``p99_tolerance`` of
        its P99, else the default. A multi-stage plan must
        moreover beat the best one-stage option in the same way, and the best one-stage score by
        ``switch_gain``: stages split the capacity, and what a window showed may not come again."""
        if not self.config.check_plans:
            plan = self._dp(demand)
            return plan, self._unchecked_policy(plan)
        start = time.perf_counter()
        plans = self._candidates(demand)
        forced = self.config.within_stage
        options = [(p, forced if forced != "auto" else "least-loaded") for p in plans]
        if forced == "auto":
            options += [(plans[0], "llumnix"), (plans[-1], "llumnix")]
        single = StagePlan.single(self.num_replicas, self.max_len)
        default = incumbent if incumbent is not None else (single, self._unchecked_policy(single))
        unique: dict[tuple, tuple[StagePlan, str]] = {}
        for plan, policy in [default, *options]:
            unique.setdefault((plan.boundaries, plan.replica_counts, policy), (plan, policy))
        replicas = self.num_replicas
        if max(len(p.replica_counts) for p, _ in unique.values()) <= self.config.score_replicas < replicas:
            replicas = self.config.score_replicas
        requests = self._score_requests(sample, weights, rate, replicas, replay)
        # scored on each half of the window apart: a plan must hold up on both (a window is not stationary),
        # and on the whole window at stress_load times its rate (a plan must hold up when load rises)
        parts = [requests[:len(requests) // 2], requests[len(requests) // 2:]] if len(requests) >= 40 else [requests]
        if self.config.stress_load > 1:
            parts.append(scale_rate(requests, self.config.stress_load))
        latency = {key: [self._score(*option, part, replicas) for part in parts] for key, option in unique.items()}
        # judged on mean E2E (a part's P99 is its few slowest requests: too noisy to rank by), P99 a guard
        scores = {key: math.exp(np.mean([math.log(m) for m, _ in parts])) for key, parts in latency.items()}
        tails = {key: math.exp(np.mean([math.log(p) for _, p in parts])) for key, parts in latency.items()}
        pooled = [k for k in unique if len(k[1]) == 1]
        kept = (default[0].boundaries, default[0].replica_counts, default[1])
        gain, tol = self.config.switch_gain, 1 + self.config.p99_tolerance
        if first:  # nothing chosen from data to keep: the default only within a window's noise
            better = [k for k in pooled if scores[k] <= scores[kept] * (1 - self.config.first_gain)
                      and tails[k] <= tails[kept] * tol]
            kept = min(better, key=scores.get, default=kept)
        # a change must pay: no worse on mean in any part, P99 over the parts within the tolerance, and
        # mean better overall by switch_gain; stages must also pay for their risk (a window does not show
        # what comes next, and stages split the capacity): a multi-stage plan must beat the best pooled
        # (one-stage) option as a change would

        def beats(key, ref) -> bool:
            return key == ref or (scores[key] <= scores[ref] * (1 - gain) and tails[key] <= tails[ref] * tol
                                  and all(m <= rm for (m, _), (rm, _) in zip(latency[key], latency[ref], strict=True)))
        ref = min((k for k in pooled if beats(k, kept)), key=scores.get, default=kept)
        best_pooled = min((scores[k] for k in pooled), default=math.inf)
        staged = [k for k in unique if len(k[1]) > 1 and beats(k, ref)
                  and (k == kept or scores[k] <= best_pooled * (1 - gain))]
        key = min(staged, key=scores.get, default=ref)
        # what runs while stages chosen on a first window await confirmation; none if they won decisively
        decisive = scores[key] <= best_pooled * (1 - self.config.decisive_gain)
        self._fallback = None if decisive else unique[ref]
        self.last_check = {"candidates": [{"boundaries": list(b), "replica_counts": list(c), "within_stage": w,
                                           "mean_e2e": [m for m, _ in latency[(b, c, w)]],
                                           "p99_e2e": [p for _, p in latency[(b, c, w)]],
                                           "score": score} for (b, c, w), score in scores.items()],
                           "chosen": {"boundaries": list(key[0]), "replica_counts": list(key[1]),
                                      "within_stage": key[2]},
                           "scored_replicas": replicas, "scored_requests": len(requests),
                           "seconds": time.perf_counter() - start}
        self.num_checks += 1
        self.check_seconds += self.last_check["seconds"]
        return unique[key]

    def _score_requests(self, sample, weights, rate: float, replicas: int,
                        replay: list[TraceRequest] | None) -> list[TraceRequest]:
        """What the candidates are simulated on (a fixed seed: every candidate sees the same): the last
        ``score_requests`` of ``replay`` (bursts and length runs as they came), thinned to ``replicas``
        when fewer than the cluster's; without a replay, as many requests with lengths drawn from the
        weighted sample and Poisson arrivals at ``rate`` scaled to ``replicas``."""
        rng = np.random.default_rng(len(sample))
        n = self.config.score_requests
        cap = min(self.max_len, self.cost_model.kv_capacity_tokens)
        if replay:
            share = replicas / self.num_replicas
            last = replay[-int(math.ceil(n / share)):]
            kept = [r for r, keep in zip(last, rng.random(len(last)) < share, strict=True) if keep]
            return cap_lengths(kept or last[-1:], cap)
        rate *= replicas / self.num_replicas
        w = np.asarray(weights, float)
        picks = rng.choice(len(sample), n, p=w / w.sum())
        arrivals = np.cumsum(rng.exponential(1 / max(rate, 1e-9), n))
        drawn = [TraceRequest(t, max(int(sample[k][0]), 1), max(int(sample[k][1]), 1))
                 for t, k in zip(arrivals.tolist(), picks.tolist(), strict=True)]
        return cap_lengths(drawn, cap)

    def _score(self, plan: StagePlan, within_stage: str, requests, replicas: int) -> tuple[float, float]:
        """Simulated mean and P99 E2E latency of ``plan`` (its replica counts scaled to ``replicas``,
        each stage keeping at least one) with ``within_stage`` in its stages."""
        counts = _scaled_counts(plan.replica_counts, replicas)
        scaled = StagePlan(plan.boundaries, counts)
        config = dataclasses.replace(self.config, check_plans=False, within_stage=within_stage)
        router = CascadeRouter(replicas, self.cost_model, self.max_len, plan=scaled, grid=self.grid, refine=False,
                               replan=False, config=config)
        summary = Simulator(router, self.cost_model, replicas, requests).run().summary
        return summary["mean_e2e"], summary["p99_e2e"]

    def _window_replay(self, sample, weights) -> list[TraceRequest]:
        """The window's arrivals as they came, each with its output length once it finished, else one
        drawn from the weighted sample's requests of its prompt bucket (any bucket if it has none)."""
        rng = np.random.default_rng(len(self._arrivals))
        buckets = len(self.grid) - 1
        prompts = np.array([p for p, _ in sample], float)
        k_sample = np.minimum(np.searchsorted(self.grid, prompts, side="right") - 1, buckets - 1)
        w = np.asarray(weights, float)
        replay = []
        for t, p, request_id in self._arrivals:
            out = self._outputs.get(request_id)
            if out is None:
                k = min(bisect.bisect_right(self.grid, p) - 1, buckets - 1)
                pool = np.flatnonzero(k_sample == k)
                pool = pool if len(pool) else np.arange(len(sample))
                out = sample[int(rng.choice(pool, p=w[pool] / w[pool].sum()))][1]
            replay.append(TraceRequest(t, max(int(p), 1), max(int(out), 1)))
        return replay

    def _window_sample(self) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The window's finished (prompt, output) pairs, re-weighted per prompt bucket to the window's
        arrivals: long requests finish late (and not at all in an overloaded stage), so finished
        requests alone under-count them. A bucket with arrivals but nothing finished yet gets one
        pseudo-request (its mean prompt, the overall mean output) weighted by its arrivals."""
        buckets = len(self.grid) - 1
        arr = np.array([p for _, p, _ in self._arrivals], float)
        fin = np.array([(p, o) for _, p, o in self._finished], float)
        k_arr = np.minimum(np.searchsorted(self.grid, arr, side="right") - 1, buckets - 1)
        k_fin = np.minimum(np.searchsorted(self.grid, fin[:, 0], side="right") - 1, buckets - 1)
        n_arr = np.bincount(k_arr, minlength=buckets).astype(float)
        n_fin = np.bincount(k_fin, minlength=buckets).astype(float)
        weights = n_arr[k_fin] / n_fin[k_fin]
        sample = [(int(p), int(o)) for p, o in fin]
        for k in np.flatnonzero((n_arr > 0) & (n_fin == 0)):
            sample.append((int(arr[k_arr == k].mean()), max(int(fin[:, 1].mean()), 1)))
            weights = np.append(weights, n_arr[k])
        return sample, weights

def _same_proposal(a: tuple, b: tuple) -> bool:
    """Two checks chose the same change: the same plan, or stages (any, with either within-stage policy)."""
    return a == b or (len(a[1]) > 1 and len(b[1]) > 1)


def _scaled_counts(counts: tuple[int, ...], total: int) -> tuple[int, ...]:
    """Replica counts scaled to sum to ``total`` (largest remainders), every stage keeping one."""
    if sum(counts) == total:
        return tuple(counts)
    share = np.asarray(counts, float) * total / sum(counts)
    out = np.maximum(np.floor(share).astype(int), 1)
    while out.sum() < total:
        out[int(np.argmax(share - out))] += 1
    while out.sum() > total:
        k = int(np.argmax(np.where(out > 1, out - share, -np.inf)))
        out[k] -= 1
    return tuple(int(x) for x in out)


def _load_key(r: ReplicaLoad) -> tuple:
    """Least-loaded dispatch's key: virtual KV usage, then the shorter queue."""
    return (r.usage, r.num_waiting, r.replica)


def _pages(req: RequestLoad, rep: ReplicaLoad) -> int:
    return -(-req.context_len // max(rep.page_size, 1))


def _histogram(decode: np.ndarray, arrivals: np.ndarray) -> np.ndarray:
    """Where the work is: decode steps and arrivals per bucket, each normalised, side by side."""
    parts = [x / x.sum() if x.sum() > 0 else np.full(len(x), 1 / len(x)) for x in (decode, arrivals)]
    return np.concatenate(parts) / 2


def _kl(p: np.ndarray, q: np.ndarray, floor: float = 1e-4) -> float:
    p, q = p + floor, q + floor
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))
