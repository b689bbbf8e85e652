"""A discrete-event simulator of a replica cluster that drives the same router objects as the real
cluster (pure Python + numpy, no jax).

``SimReplica`` mimics the engine's continuous batching: at most max_num_seqs running, a token
budget per step, chunked prefill of waiting requests first come first served, a paged KV pool
(admission only when the chunk's pages fit), preemption by recompute of the newest running request
when a running one cannot get a page, and a step that lasts ``cost_model.step_seconds(decodes,
longest decode context, prefill tokens, prefill KV extent, mean decode context)`` (a length-mixed
batch costs by the profile's ``decode_mix_padding``).

``Simulator`` runs the event loop: arrivals (``router.dispatch``), step completions, and rebalance
ticks every ``router.interval`` (``router.rebalance``; while the cluster is empty the ticks skip to the
next arrival), whose Migration orders it carries out:

- live: pre-copy rounds copy the request's full pages at the cost model's copy bandwidth while it
  keeps decoding at the source (at most ``max_precopy_rounds``); then the request pauses for a
  stop-and-copy of the rest and commits at the destination, whose pages were reserved up front.
  A destination without room aborts the migration (the request stays at the source), as does the
  request finishing or being preempted meanwhile;
- recompute: the request stops, frees its KV and re-prefills at the front of the destination's queue;
- auto: whichever the cost model says is cheaper for the request's context.

Snapshots: counters (pages, queue demand, migrations) are always current; each request's
``context_len`` is refreshed at every rebalance tick and when the request changes state, so between
ticks a dispatch sees contexts up to one interval old, like a cluster that polls its replicas.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from jaxinfer.router.base import MIGRATION_MODES, Migration, NewRequest, ReplicaLoad, RequestLoad, Router
from jaxinfer.router.cost_model import CostModel


class SimRequest:
    __slots__ = ("request_id", "arrival", "prompt_len", "output_len", "generated", "num_computed", "pages",
                 "running", "replica", "first_token", "finish", "migrations", "preemptions", "pause_start",
                 "paused_seconds", "paused", "mig", "load", "epoch")

    def __init__(self, request_id: str, arrival: float, prompt_len: int, output_len: int):
        self.request_id, self.arrival, self.prompt_len, self.output_len = request_id, arrival, prompt_len, output_len
        self.generated = self.num_computed = self.pages = self.migrations = self.preemptions = 0
        self.epoch = 0  # bumped whenever it leaves a batch (finish, preemption, migration)
        self.running = self.paused = False
        self.replica = -1
        self.first_token = self.finish = self.pause_start = None
        self.paused_seconds = 0.0
        self.mig: _Move | None = None
        self.load: RequestLoad | None = None

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.generated


@dataclasses.dataclass(eq=False)
class _Move:
    """One migration in flight."""

    req: SimRequest
    src: int
    dst: int
    mode: str  # "live" or "recompute"
    reason: str
    reserved: int = 0  # destination pages held for it
    copied: int = 0  # tokens already at the destination
    rounds: int = 0


class SimReplica:
    """One replica's continuous-batching scheduler and KV pool."""

    def __init__(self, index: int, cost_model: CostModel, *, max_num_seqs: int, max_num_batched_tokens: int,
                 kv_capacity_tokens: int, page_size: int):
        self.index, self.cost_model = index, cost_model
        self.max_num_seqs, self.max_num_batched_tokens, self.page_size = max_num_seqs, max_num_batched_tokens, page_size
        self.total_pages = kv_capacity_tokens // page_size
        self.used_pages = 0  # held by its requests plus reserved for incoming migrations
        self.waiting: deque[SimRequest] = deque()
        self.waiting_pages = 0
        self.running: list[SimRequest] = []
        self.step: list[tuple[SimRequest, int, int]] = []  # (request, tokens, its epoch)
        self.busy = False
        self.step_parts = (0.0, 0.0)  # the step in flight alone: decode and prefill seconds
        self.step_version = 0  # bumped when processor sharing moves the step's completion
        self.progress, self.progress_time = 0.0, 0.0  # share of the step done, as of progress_time
        self.accepting = True
        self.migrations_in_flight = 0
        self.last_step_seconds = self.busy_seconds = 0.0
        self.num_steps = self.num_preemptions = 0
        self.padded_tokens = self.context_tokens = 0  # decode rows x longest context, and the real contexts
        self.on_preempt = lambda req: None
        self._loads: tuple[RequestLoad, ...] | None = None

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def free_pages(self) -> int:
        return self.total_pages - self.used_pages

    def touch(self, req: SimRequest | None = None) -> None:
        """Mark the snapshot stale (a request changed state or membership)."""
        if req is not None:
            req.load = None
        self._loads = None

    def enqueue(self, req: SimRequest, front: bool = False) -> None:
        req.replica, req.running = self.index, False
        (self.waiting.appendleft if front else self.waiting.append)(req)
        self.waiting_pages += self.pages_for(req.context_len)
        self.touch(req)

    def release(self, req: SimRequest) -> None:
        """Take a running request out, freeing its pages."""
        self.running.remove(req)
        self.used_pages -= req.pages
        req.pages, req.running = 0, False
        req.epoch += 1
        self.touch(req)

    def schedule(self, slowdown: tuple[float, float] = (1.0, 1.0)) -> float | None:
        """Plan the next step (allocating its pages); its duration (its decode and prefill parts
        stretched by ``slowdown``), or None when there is nothing to run."""
        budget, step, preempted = self.max_num_batched_tokens, [], False
        num_decode = max_ctx = sum_ctx = prefill_tokens = prefill_kv = 0
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.paused:
                i += 1
                continue
            ctx = req.prompt_len + req.generated
            n = 1 if req.generated and ctx - req.num_computed == 1 else min(ctx - req.num_computed, budget)
            need = self.pages_for(req.num_computed + n) - req.pages
            while need > self.free_pages:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if not req.running:
                break
            self.used_pages += need
            req.pages += need
            step.append((req, n, req.epoch))
            budget -= n
            i += 1
            if n == 1 and req.generated:
                num_decode += 1
                sum_ctx += ctx
                max_ctx = max(max_ctx, ctx)
            else:
                prefill_tokens += n
                prefill_kv += req.num_computed + n
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.context_len, budget)
            need = self.pages_for(n)
            if need > self.free_pages:
                break
            self.waiting.popleft()
            self.waiting_pages -= self.pages_for(req.context_len)
            self.running.append(req)
            req.running, req.pages = True, need
            self.used_pages += need
            self.touch(req)
            step.append((req, n, req.epoch))
            budget -= n
            prefill_tokens += n
            prefill_kv += n
        if not step:
            return None
        self.step, self.busy = step, True
        decode, prefill = self.cost_model.step_parts(num_decode, max_ctx, prefill_tokens, prefill_kv,
                                                     sum_ctx / num_decode if num_decode else None)
        self.step_parts = (decode, prefill)
        seconds = decode * slowdown[0] + prefill * slowdown[1] + self.cost_model.step_overhead
        self.last_step_seconds = seconds
        self.busy_seconds += seconds
        self.num_steps += 1
        self.padded_tokens += num_decode * max_ctx
        self.context_tokens += sum_ctx
        return seconds

    def _preempt(self, req: SimRequest) -> None:
        self.on_preempt(req)  # aborts its migration, if any
        self.release(req)
        req.num_computed = 0
        req.preemptions += 1
        self.num_preemptions += 1
        self.enqueue(req, front=True)

    def complete(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the step's results: (finished requests, requests that produced a token after a pause)."""
        finished, resumed = [], []
        for req, n, epoch in self.step:
            if req.epoch != epoch:
                continue  # migrated away meanwhile: this step's work for it is lost
            req.num_computed += n
            if req.num_computed < req.prompt_len + req.generated:
                continue
            req.generated += 1
            if req.first_token is None:
                req.first_token = now
            if req.pause_start is not None:
                req.paused_seconds += now - req.pause_start
                req.pause_start = None
                resumed.append(req)
            if req.generated >= req.output_len:
                req.finish = now
                self.release(req)
                finished.append(req)
        self.step, self.busy = [], False
        return finished, resumed

    def snapshot(self, refresh: bool) -> ReplicaLoad:
        """The router's view; ``refresh`` rebuilds every request whose context moved since its last view."""
        if refresh or self._loads is None:
            loads = []
            for req in (*self.running, *self.waiting):
                load = req.load
                if load is None or (refresh and load.context_len != req.prompt_len + req.generated):
                    load = req.load = RequestLoad(req.request_id, req.prompt_len, req.prompt_len + req.generated,
                                                  req.output_len, req.running, req.mig is not None)
                loads.append(load)
            self._loads = tuple(loads)
        return ReplicaLoad(self.index, self._loads, self.used_pages, self.total_pages, self.page_size,
                           self.waiting_pages, self.migrations_in_flight, self.accepting, self.last_step_seconds)


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    first_token: float
    finish: float
    migrations: int
    preemptions: int
    paused_seconds: float  # stopped for migration or recompute until its next token
    replica: int  # where it finished


@dataclasses.dataclass
class SimResult:
    records: list[RequestRecord]
    summary: dict
    occupancy: dict  # "times", "per_replica" [[requests per replica] per sample], cascade: "stages", "boundaries"


class Simulator:
    def __init__(self, router: Router, cost_model: CostModel, num_replicas: int, requests, *,
                 migration: str = "live", max_precopy_rounds: int = 3, last_round_pages: int = 16,
                 max_occupancy_samples: int = 1000, host_slowdown: Sequence[float] | None = None):
        """requests: (arrival_seconds, prompt_len, output_len) tuples. The replicas take their budgets
        and KV pool from the cost model. host_slowdown[k-1]: how much longer a step takes while k
        replicas step at once (replicas sharing one host's cores); past its end, its last value.
        None: the cost model's own host model (``CostModel.host_slowdown``), if its profile has one."""
        if migration not in MIGRATION_MODES:
            raise ValueError(f"migration must be one of {', '.join(MIGRATION_MODES)}, got {migration!r}")
        if num_replicas < 1 or max_precopy_rounds < 1 or last_round_pages < 0:
            raise ValueError(f"need num_replicas >= 1, max_precopy_rounds >= 1, last_round_pages >= 0, got "
                             f"{num_replicas}, {max_precopy_rounds}, {last_round_pages}")
        if host_slowdown is not None and (not host_slowdown or any(not x > 0 for x in host_slowdown)):
            raise ValueError(f"host_slowdown must be positive factors, got {host_slowdown!r}")
        self.host_slowdown = tuple(host_slowdown) if host_slowdown is not None else None
        self.router, self.cost_model, self.migration = router, cost_model, migration
        self.max_precopy_rounds, self.last_round_tokens = max_precopy_rounds, last_round_pages * cost_model.page_size
        self.replicas = [SimReplica(i, cost_model, max_num_seqs=cost_model.max_num_seqs,
                                    max_num_batched_tokens=cost_model.max_num_batched_tokens,
                                    kv_capacity_tokens=cost_model.kv_capacity_tokens, page_size=cost_model.page_size)
                         for i in range(num_replicas)]
        for rep in self.replicas:
            rep.on_preempt = self._on_preempt
        self.requests = []
        for i, (arrival, prompt, output) in enumerate(sorted(requests, key=lambda r: r[0])):
            if prompt < 1 or output < 1 or prompt + output > cost_model.kv_capacity_tokens:
                raise ValueError(f"request {i}: need prompt >= 1, output >= 1 and prompt + output <= KV capacity "
                                 f"{cost_model.kv_capacity_tokens}, got {prompt}, {output}")
            self.requests.append(SimRequest(f"r{i}", float(arrival), int(prompt), int(output)))
        self._by_id = {r.request_id: r for r in self.requests}
        self.max_occupancy_samples = max_occupancy_samples
        self.counts = {"orders": 0, "rejected": 0, "started": 0, "committed": 0, "aborted_dst_full": 0,
                       "aborted_finished": 0, "aborted_preempted": 0, "live": 0, "recompute": 0}
        self.reasons: dict[str, int] = {}

    # ---- event loop ------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        events: list = []
        seq = 0

        def push(t, kind, data=None):
            nonlocal seq
            heapq.heappush(events, (t, seq, kind, data))
            seq += 1

        for i, req in enumerate(self.requests):
            push(req.arrival, "arrival", i)
        interval = self.router.interval
        if not interval > 0:
            raise ValueError(f"router.interval must be positive, got {interval}")
        start = self.requests[0].arrival if self.requests else 0.0
        push(start + interval, "tick")
        horizon = (self.requests[-1].arrival - start) if self.requests else 0.0
        sample_every = max(1, int(horizon / interval / self.max_occupancy_samples) + 1)
        occupancy: dict = {"times": [], "per_replica": []}
        self._push = push
        self._kicks: list[SimReplica] = []
        self._busy = 0  # replicas in a step
        dispatch_s = rebalance_s = 0.0
        num_dispatch = num_rebalance = ticks = 0
        unfinished = len(self.requests)
        while events and unfinished:
            now, _, kind, data = heapq.heappop(events)
            if kind == "arrival":
                req = self.requests[data]
                snaps = [rep.snapshot(False) for rep in self.replicas]
                t0 = time.perf_counter()
                target = self.router.dispatch(NewRequest(req.request_id, req.prompt_len, req.output_len), snaps, now)
                dispatch_s += time.perf_counter() - t0
                num_dispatch += 1
                if not (isinstance(target, int | np.integer) and 0 <= target < len(self.replicas)
                        and self.replicas[target].accepting):
                    raise ValueError(f"router {self.router.name} dispatched to {target!r}, not an accepting replica")
                self.replicas[target].enqueue(req)
                self._kicks.append(self.replicas[target])
            elif kind == "step":
                rep = self.replicas[data[0]]
                if data[1] != rep.step_version:  # rescheduled by processor sharing
                    continue
                self._busy -= 1
                self._share(now, rep, self._busy + 1)
                finished, resumed = rep.complete(now)
                for req in resumed:
                    if req.mig is not None and req.mig.mode == "recompute":
                        self._end_move(req.mig)
                for req in finished:
                    unfinished -= 1
                    if req.mig is not None:
                        self._abort(req.mig, "aborted_finished")
                    self.router.on_finish(req.request_id, req.prompt_len, req.output_len, now)
                self._kicks.append(rep)
            elif kind == "tick":
                ticks += 1
                snaps = [rep.snapshot(True) for rep in self.replicas]
                t0 = time.perf_counter()
                orders = self.router.rebalance(snaps, now)
                rebalance_s += time.perf_counter() - t0
                num_rebalance += 1
                for order in orders:
                    self._start(order, now)
                if ticks % sample_every == 0:
                    self._sample(occupancy, now)
                skip = 1
                if num_dispatch == len(self.requests) - unfinished and not self._busy and events:
                    # an empty cluster: the next tick that can see anything is the first at or after the next
                    # event (the ticks between would find nothing to do; long idle gaps at light load)
                    skip = max(1, int(np.ceil((events[0][0] - now) / interval - 1e-9)))
                push(now + skip * interval, "tick")
            else:
                self._advance(kind, data, now)
            self._run_kicks(now)
        router_stats = {"dispatch_seconds": dispatch_s, "rebalance_seconds": rebalance_s,
                        "num_dispatch": num_dispatch, "num_rebalance": num_rebalance}
        return self._result(router_stats, occupancy)

    def _run_kicks(self, now: float) -> None:
        """Plan steps on the idle replicas an event touched (after it, never from inside another)."""
        while self._kicks:
            rep = self._kicks.pop(0)
            if not rep.busy:
                if self.host_slowdown is None:  # the cost model's host sharing, if it has one
                    slowdown = self.cost_model.host_slowdown(self._busy + 1)
                else:
                    factor = self.host_slowdown[min(self._busy, len(self.host_slowdown) - 1)]
                    slowdown = (factor, factor)
                seconds = rep.schedule(slowdown)
                if seconds is not None:
                    self._busy += 1
                    rep.step_version += 1
                    rep.progress, rep.progress_time = 0.0, now
                    self._push(now + seconds, "step", (rep.index, rep.step_version))
                    self._share(now, rep, self._busy - 1)

    def _step_time(self, rep: SimReplica, busy: int) -> float:
        decode, prefill = rep.step_parts
        stretch = self.cost_model.host_slowdown(busy)
        return decode * stretch[0] + prefill * stretch[1] + self.cost_model.step_overhead

    def _share(self, now: float, changed: SimReplica, before: int) -> None:
        """Processor sharing on a host model: when the number of replicas in a step changes, every
        other step in flight continues at the new pace (its completion moves)."""
        if self.host_slowdown is not None or "host" not in self.cost_model.extra:
            return
        for rep in self.replicas:
            if not rep.busy or rep is changed:
                continue
            rep.progress += (now - rep.progress_time) / self._step_time(rep, before)
            rep.progress_time = now
            rep.step_version += 1
            left = max(1.0 - rep.progress, 0.0) * self._step_time(rep, self._busy)
            self._push(now + left, "step", (rep.index, rep.step_version))

    def _sample(self, occupancy: dict, now: float) -> None:
        occupancy["times"].append(now)
        occupancy["per_replica"].append([len(r.running) + len(r.waiting) for r in self.replicas])
        info = self.router.describe()
        if "stages" in info:
            per = occupancy["per_replica"][-1]
            occupancy.setdefault("stages", []).append([sum(per[i] for i in st["replicas"]) for st in info["stages"]])
            bounds = [st["lo"] for st in info["stages"]] + [info["stages"][-1]["hi"]]
            occupancy.setdefault("boundaries", []).append(bounds)

    # ---- migrations ------------------------------------------------------------------------------------

    def _start(self, order: Migration, now: float) -> None:
        self.counts["orders"] += 1
        req = self._by_id.get(order.request_id)
        n = len(self.replicas)
        if (req is None or req.finish is not None or not req.running or req.mig is not None or req.replica != order.src
                or not 0 <= order.dst < n or order.dst == order.src or not self.replicas[order.dst].accepting):
            self.counts["rejected"] += 1
            return
        src, dst = self.replicas[order.src], self.replicas[order.dst]
        mode = self.migration
        if mode == "auto":
            ctx, cm = req.context_len, self.cost_model
            mode = "live" if cm.transfer_seconds(ctx) <= cm.recompute_seconds(ctx) else "recompute"
        move = _Move(req, src.index, dst.index, mode, order.reason)
        if mode == "live":
            need = dst.pages_for(req.num_computed + 1)
            if need > dst.free_pages:
                self.counts["aborted_dst_full"] += 1
                return
            dst.used_pages += need
            move.reserved = need
        self.counts["started"] += 1
        self.counts[mode] += 1
        self.reasons[order.reason] = self.reasons.get(order.reason, 0) + 1
        req.mig = move
        src.migrations_in_flight += 1
        dst.migrations_in_flight += 1
        src.touch(req)
        dst.touch()
        if mode == "live":
            self._copy_round(move, now)
            return
        src.release(req)
        req.num_computed, req.pause_start = 0, now
        req.migrations += 1
        dst.enqueue(req, front=True)
        self._kicks += [src, dst]

    def _copy_round(self, move: _Move, now: float) -> None:
        req, page = move.req, self.cost_model.page_size
        full = req.num_computed // page * page
        self._push(now + self.cost_model.transfer_seconds(full - move.copied), "copied", (move, full))

    def _advance(self, kind: str, data, now: float) -> None:
        move, copied = data
        req = move.req
        if req.mig is not move:
            return  # aborted meanwhile
        src, dst = self.replicas[move.src], self.replicas[move.dst]
        if kind == "copied":
            move.copied, move.rounds = copied, move.rounds + 1
            need = dst.pages_for(req.num_computed + 1) - move.reserved
            if need > dst.free_pages:
                self._abort(move, "aborted_dst_full")
                return
            dst.used_pages += max(need, 0)
            move.reserved += max(need, 0)
            remaining = req.num_computed - move.copied
            if move.rounds < self.max_precopy_rounds and remaining > self.last_round_tokens:
                self._copy_round(move, now)
                return
            req.paused, req.pause_start = True, now  # stop and copy the rest
            self._push(now + self.cost_model.transfer_seconds(remaining), "commit", (move, req.num_computed))
        elif kind == "commit":
            need = dst.pages_for(req.num_computed) - move.reserved
            if not dst.accepting or len(dst.running) >= dst.max_num_seqs or need > dst.free_pages:
                self._abort(move, "aborted_dst_full")
                return
            src.release(req)
            dst.used_pages += need
            req.pages = move.reserved + need
            req.replica, req.running, req.paused = dst.index, True, False
            req.migrations += 1
            dst.running.append(req)
            self._end_move(move)
            self.counts["committed"] += 1
            self._kicks += [src, dst]

    def _end_move(self, move: _Move) -> None:
        src, dst = self.replicas[move.src], self.replicas[move.dst]
        src.migrations_in_flight -= 1
        dst.migrations_in_flight -= 1
        src.touch(move.req)
        dst.touch(move.req)
        move.req.mig = None
        if move.mode == "recompute":
            self.counts["committed"] += 1

    def _abort(self, move: _Move, why: str) -> None:
        """Give up a live migration: the request stays at the source (a paused one resumes there)."""
        self.replicas[move.dst].used_pages -= move.reserved
        move.req.paused = False
        self._end_move(move)
        self.counts[why] += 1
        self._kicks += [self.replicas[move.src], self.replicas[move.dst]]

    def _on_preempt(self, req: SimRequest) -> None:
        if req.mig is not None and req.mig.mode == "live":
            self._abort(req.mig, "aborted_preempted")

    # ---- results ---------------------------------------------------------------------------------------

    def _result(self, router_stats: dict, occupancy: dict) -> SimResult:
        records = [RequestRecord(r.request_id, r.arrival, r.prompt_len, r.output_len, r.first_token, r.finish,
                                 r.migrations, r.preemptions, r.paused_seconds, r.replica) for r in self.requests]
        return SimResult(records, summarize(records, router_stats, self), occupancy)


def summarize(records: list[RequestRecord], router_stats: dict, sim: Simulator | None = None) -> dict:
    """Latency, throughput, migration and router-time statistics of a finished run."""
    if not records:
        return {"requests": 0}
    arrival = np.array([r.arrival for r in records])
    first = np.array([r.first_token for r in records])
    finish = np.array([r.finish for r in records])
    out = np.array([r.output_len for r in records])
    e2e, ttft = finish - arrival, first - arrival
    multi = out > 1
    tpot = (finish[multi] - first[multi]) / (out[multi] - 1)
    makespan = max(float(finish.max() - arrival.min()), 1e-9)
    decisions = router_stats["num_dispatch"] + router_stats["num_rebalance"]
    router_seconds = router_stats["dispatch_seconds"] + router_stats["rebalance_seconds"]
    summary = {  # seconds unless named otherwise
        "requests": len(records), "makespan": makespan,
        "mean_e2e": float(e2e.mean()), "p50_e2e": float(np.percentile(e2e, 50)),
        "p99_e2e": float(np.percentile(e2e, 99)), "mean_ttft": float(ttft.mean()),
        "p99_ttft": float(np.percentile(ttft, 99)), "mean_tpot": float(tpot.mean()) if tpot.size else 0.0,
        "requests_per_second": len(records) / makespan, "tokens_per_second": float(out.sum()) / makespan,
        "migrations_per_request": sum(r.migrations for r in records) / len(records),
        "preemptions_per_request": sum(r.preemptions for r in records) / len(records),
        "mean_paused": float(np.mean([r.paused_seconds for r in records])),
        "router_seconds": router_seconds, "router_ms_per_decision": 1e3 * router_seconds / max(decisions, 1),
        "dispatch_us": 1e6 * router_stats["dispatch_seconds"] / max(router_stats["num_dispatch"], 1),
        "rebalance_us": 1e6 * router_stats["rebalance_seconds"] / max(router_stats["num_rebalance"], 1),
        **router_stats,
    }
    if sim is not None:
        padded = sum(r.padded_tokens for r in sim.replicas)
        summary["decode_padding_fraction"] = 1 - sum(r.context_tokens for r in sim.replicas) / max(padded, 1)
        summary["busy_fraction"] = sum(r.busy_seconds for r in sim.replicas) / (makespan * len(sim.replicas))
        summary["migrations"] = dict(sim.counts, **{f"reason_{k}": v for k, v in sim.reasons.items()})
    return summary
