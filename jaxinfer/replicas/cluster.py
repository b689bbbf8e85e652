"""Replica groups behind one router: N engines (one per sub-mesh, each with its own loop thread)
presented to the serving front end like a single AsyncEngine.

New requests go where the router's ``dispatch`` says. Every ``router.interval`` seconds the router
sees a load snapshot of every replica and may order migrations, which run as asyncio tasks: live
(pre-copy the request's complete KV pages while it keeps decoding at the source, then a short
stop-and-copy and a commit at the destination) or by recompute (the destination prefills the
tokens again), whichever the cost model says is cheaper. The request's stream object moves with
it, so the client sees one unbroken token stream. A migration that fails at any point leaves the
request running on exactly one replica: the source until the destination has committed.

Replicas in other processes (jaxinfer.replicas.ray_replica) can be lost: their requests resume on
the survivors from the tokens their streams hold, the router is told which replicas are up (a
cascade re-plans its stages), and a replica whose actor Ray restarts rejoins and takes traffic
again. Migration steps between processes have a deadline (``step_timeout``), and what a step sets
aside is held for ``hold_seconds`` only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import time
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from jaxinfer.engine.async_engine import EngineDeadError, RequestStream
from jaxinfer.engine.client import EngineInfo
from jaxinfer.engine.engine import Engine, EngineMetrics
from jaxinfer.engine.request_output import RequestOutput
from jaxinfer.replicas.migration import (
    MigrationStats,
    MigrationTimeout,
    RequestGone,
    RequestOrphaned,
    migration_mode,
    move_request,
)
from jaxinfer.replicas.replica import LocalReplica
from jaxinfer.router.base import MIGRATION_MODES, Migration, NewRequest, ReplicaLoad, RequestLoad, Router
from jaxinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from jaxinfer.replicas.ray_replica import RayReplica as RemoteReplica
    from jaxinfer.router.cost_model import CostModel

logger = logging.getLogger(__name__)


class Cluster:
    def __init__(self, replicas: Seq[Engine | RemoteReplica], router: Router, *, migration: str = "auto",
                 cost_model: CostModel | None = None, precopy_rounds: int = 3, last_round_pages: int = 16,
                 max_migrations: int = 8, step_timeout: float = 30.0, hold_seconds: float | None = None,
                 links: dict[tuple[int, int], float] | None = None):
        """replicas: engines of this process (each gets a LocalReplica) or replicas elsewhere (a
        RayReplica: anything with the LocalReplica surface and ``on_finish``/``on_lost``/``on_rejoin``
        to set). step_timeout: deadline of each migration step between processes; hold_seconds: how
        long an end keeps what a step set aside (default four deadlines). links: measured bytes/s of
        each (source, destination) pair, for the cost model's choice between a live move and a
        recompute (jaxinfer.replicas.ray_replica.measure_links)."""
        if not replicas:
            raise ValueError("a cluster needs at least one replica")
        if migration not in MIGRATION_MODES:
            raise ValueError(f"migration must be one of {', '.join(MIGRATION_MODES)}, got {migration!r}")
        if not step_timeout > 0 or (hold_seconds is not None and not hold_seconds > step_timeout):
            raise ValueError(f"need step_timeout > 0 and hold_seconds > step_timeout, got {step_timeout}, "
                             f"{hold_seconds}")
        self.step_timeout = step_timeout
        self.hold_seconds = 4 * step_timeout if hold_seconds is None else hold_seconds
        self.replicas = []
        for replica in replicas:
            if isinstance(replica, Engine):
                replica = LocalReplica(replica, on_finish=self._on_finish)
            else:
                replica.on_finish = self._on_finish
                replica.on_lost = self._on_lost
                replica.on_rejoin = self._on_rejoin
            self.replicas.append(replica)
        self.router = router
        self.migration_mode = migration
        self.cost_model = cost_model
        self.precopy_rounds = precopy_rounds
        self.last_round_pages = last_round_pages
        self.max_migrations = max_migrations
        self.links = dict(links or {})
        self.stats = MigrationStats()
        self.failover = {"replicas_lost": 0, "replicas_rejoined": 0, "requests_resumed": 0, "requests_failed": 0}
        self.router_seconds = 0.0
        self.router_decisions = 0
        self._owner: dict[str, int] = {}  # request id -> replica running it
        self._moving: dict[str, Migration] = {}
        self._aborts: set[str] = set()  # aborted while moving or being resumed: re-sent to the owner afterwards
        self._resuming: set[str] = set()
        self._finished: queue.SimpleQueue = queue.SimpleQueue()  # from the replicas' loop threads
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._started = time.monotonic()

    # -- the AsyncEngine surface ------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self.replicas[0].info  # every replica serves the same model

    @property
    def alive(self) -> bool:
        return any(replica.alive for replica in self.replicas)

    @property
    def metrics(self) -> EngineMetrics:
        """All replicas' snapshots added up."""
        return sum_metrics([replica.metrics for replica in self.replicas])

    def groups(self) -> list[dict]:
        """The replica groups: a cascade router's stages (length range, replicas), else one group of
        all replicas; with each group's summed metrics."""
        max_len = self.info.max_model_len
        stages = self.router.describe().get("stages") or [{"lo": 0, "hi": max_len,
                                                            "replicas": list(range(len(self.replicas)))}]
        return [{"name": f"stage{index}" if len(stages) > 1 else "all", "lo": stage["lo"], "hi": stage["hi"],
                 "replicas": list(stage["replicas"]),
                 "metrics": sum_metrics([self.replicas[i].metrics for i in stage["replicas"]])}
                for index, stage in enumerate(stages)]

    def set_stage_ranges(self, boundaries: Seq[int], replicas_per_stage: Seq[int] = ()) -> None:
        """Admin: move the stages' length ranges (and reassign replicas if counts are given); raises
        ValueError on bad ranges, TypeError if the router has no stages."""
        if not hasattr(self.router, "set_boundaries"):
            raise TypeError(f"router {self.router.name!r} has no stages to set")
        if replicas_per_stage:
            self.router.set_plan({"boundaries": tuple(boundaries), "replica_counts": tuple(replicas_per_stage)})
        else:
            self.router.set_boundaries(list(boundaries))

    def loads(self) -> list[ReplicaLoad]:
        """What the router sees: one snapshot per replica."""
        in_flight = [0] * len(self.replicas)
        for order in self._moving.values():
            in_flight[order.src] += 1
            in_flight[order.dst] += 1
        loads = []
        for index, replica in enumerate(self.replicas):
            m = replica.metrics
            requests = tuple(RequestLoad(r.request_id, r.prompt_len, r.context_len, r.max_tokens, r.running,
                                         r.request_id in self._moving) for r in m.requests)
            loads.append(ReplicaLoad(index, requests, m.kv_pages_used, m.kv_pages_total, m.page_size,
                                     m.waiting_pages, in_flight[index], replica.alive, m.last_step_seconds))
        return loads

    async def add_request(self, prompt: str | Seq[int], params: SamplingParams,
                          request_id: str | None = None) -> RequestStream:
        """Route a new request to a replica and queue it there (errors as AsyncEngine.add_request)."""
        self.start()
        self._collect_finished()
        if not self.alive:
            raise EngineDeadError("no replica is running")
        ids = self.info.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request_id = f"cluster-{next(self._ids)}" if request_id is None else request_id
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        start = time.perf_counter()
        try:
            target = self.router.dispatch(NewRequest(request_id, len(ids), params.max_tokens), self.loads(),
                                          time.monotonic() - self._started)
        except RuntimeError as exc:  # no replica accepting
            raise EngineDeadError(str(exc)) from None
        finally:
            self.router_seconds += time.perf_counter() - start
            self.router_decisions += 1
        stream = await self.replicas[target].add_request(ids, params, request_id, owner=self)
        self._owner[stream.request_id] = target
        return stream

    def abort(self, request_id: str) -> None:
        if request_id in self._moving or request_id in self._resuming:
            self._aborts.add(request_id)  # the migration or resume task re-sends it to whoever holds the request
        owner = self._owner.get(request_id)
        if owner is None:
            return
        if self.replicas[owner].alive:
            self.replicas[owner].abort(request_id)
        elif request_id not in self._moving:  # its replica is lost: end its stream, do not resume it
            self._owner.pop(request_id)
            self.replicas[owner].abort_lost(request_id)

    def start(self) -> None:
        """Start the router loop in the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._route())

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._task is not None:
            self._task.cancel()
        for replica in self.replicas:
            replica.shutdown(timeout)
        self.router.close()

    def describe(self) -> dict:
        """Router state, per-replica load and migration counters (Stats, /metrics, admin)."""
        decisions = max(self.router_decisions, 1)
        return {"router": self.router.describe(), "migration": self.migration_mode,
                "migrations": self.stats.as_dict(), "failover": dict(self.failover),
                "migrations_in_flight": len(self._moving),
                "links_bytes_per_second": {f"{s}->{d}": round(v) for (s, d), v in sorted(self.links.items())},
                "router_ms_per_decision": 1e3 * self.router_seconds / decisions,
                "replicas": [{"replica": load.replica, "alive": load.accepting, "running": load.num_running,
                              "waiting": load.num_waiting, "kv_usage": round(load.usage, 4),
                              "max_context": load.max_context} for load in self.loads()]}

    # -- router loop ------------------------------------------------------------------------------

    def _on_finish(self, output: RequestOutput) -> None:  # a replica's loop thread
        self._finished.put((output.request_id, len(output.prompt_ids), len(output.output_ids)))

    def _collect_finished(self) -> None:
        now = time.monotonic() - self._started
        while True:
            try:
                request_id, prompt_len, output_len = self._finished.get_nowait()
            except queue.Empty:
                return
            if request_id not in self._moving:
                self._owner.pop(request_id, None)
            self.router.on_finish(request_id, prompt_len, output_len, now)

    async def _route(self) -> None:
        while True:
            await asyncio.sleep(self.router.interval)
            try:
                self._collect_finished()
                start = time.perf_counter()
                orders = self.router.rebalance(self.loads(), time.monotonic() - self._started)
                self.router_seconds += time.perf_counter() - start
                for order in orders:
                    if order.request_id in self._moving or len(self._moving) >= self.max_migrations:
                        continue
                    if self._owner.get(order.request_id) != order.src or order.src == order.dst:
                        continue
                    self._moving[order.request_id] = order
                    self._spawn(self.migrate(order))
            except Exception:  # noqa: BLE001 - a router bug must not stop serving; logged
                logger.exception("router step failed")

    # -- failover ---------------------------------------------------------------------------------

    def _on_lost(self, index: int, request_ids: list[str]) -> None:
        """A replica in another process is gone (its actor or node died): its requests carry on
        elsewhere from the tokens their streams hold (the router's loop; from the replica's reader)."""
        self.failover["replicas_lost"] += 1
        self._members_changed()
        for request_id in request_ids:  # one being moved is resumed once its migration has failed
            self._spawn(self._resume(request_id, index))

    def _on_rejoin(self, index: int) -> None:
        """A lost replica answers again (Ray restarted its actor): it takes traffic again."""
        self.failover["replicas_rejoined"] += 1
        self._members_changed()

    def _members_changed(self) -> None:
        try:
            self.router.set_members([i for i, replica in enumerate(self.replicas) if replica.alive])
        except Exception:  # noqa: BLE001 - a router bug must not stop the failover; logged
            logger.exception("the router could not take the new replica set")

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self, request_id: str, lost: int) -> None:
        """Run the request, which no replica runs (``lost`` is gone, or stopped it for a move that
        failed), on a live replica from the tokens its stream holds."""
        if request_id in self._resuming:
            return
        self._resuming.add(request_id)
        try:
            while request_id in self._moving:  # it is resumed once its move has failed
                await asyncio.sleep(0.02)
            if self._owner.get(request_id) != lost:  # a move ended with it elsewhere, it finished or was aborted
                return
            tried: set[int] = {lost}
            while True:
                live = [i for i, r in enumerate(self.replicas) if r.alive and i not in tried]
                if not live:
                    self.failover["requests_failed"] += 1
                    self._owner.pop(request_id, None)
                    self.replicas[lost].fail_request(request_id, EngineDeadError(
                        f"replica {lost} is gone and no replica could take over request {request_id!r}"))
                    return
                lengths = self.replicas[lost].lengths(request_id)
                if lengths is None:  # its stream closed meanwhile (finished, or aborted)
                    self._owner.pop(request_id, None)
                    return
                loads = self.loads()
                target = self.router.dispatch(NewRequest(request_id, *lengths), loads,
                                              time.monotonic() - self._started)
                if target not in live:  # a router that knows no better: the least used survivor
                    target = min(live, key=lambda i: (loads[i].usage, i))
                tried.add(target)
                try:
                    if not await self.replicas[target].resume(request_id):  # its stream closed meanwhile
                        self._owner.pop(request_id, None)
                        return
                except Exception:  # noqa: BLE001 - try the next survivor; logged
                    logger.exception("resuming %s on replica %d failed", request_id, target)
                    continue
                self._owner[request_id] = target
                self.failover["requests_resumed"] += 1
                logger.info("request %s resumed on replica %d (from replica %d)", request_id, target, lost)
                return
        finally:
            self._resuming.discard(request_id)
            if request_id in self._aborts:
                self._aborts.discard(request_id)
                self.abort(request_id)

    # -- migration --------------------------------------------------------------------------------

    def _mode(self, order: Migration):
        """How ``order`` moves a request of a given context length: over its link's measured bandwidth."""
        bandwidth = self.links.get((order.src, order.dst))
        return lambda context_len: migration_mode(self.migration_mode, self.cost_model, context_len, bandwidth)

    async def migrate(self, order: Migration) -> bool:
        """Carry out one order; True if the request now runs at ``order.dst``."""
        request_id = order.request_id
        self._moving[request_id] = order
        src, dst = self.replicas[order.src], self.replicas[order.dst]
        self.stats.started += 1
        moved = False
        remote = src.remote or dst.remote
        try:
            moved = await move_request(request_id, src, dst, mode=self._mode(order), stats=self.stats,
                                       precopy_rounds=self.precopy_rounds, last_round_pages=self.last_round_pages,
                                       deadline=self.step_timeout if remote else None,
                                       hold_seconds=self.hold_seconds if remote else None)
            if moved:
                self._owner[request_id] = order.dst
        except RequestGone:
            self.stats.gone += 1
        except RequestOrphaned as exc:  # stopped at the source, which could not take it back
            self.stats.failed += 1
            logger.error("%s", exc)
            if exc.stream is not None:  # in this process: nothing to resume it from
                self._owner.pop(request_id, None)
                exc.stream._put(EngineDeadError(str(exc)))
            elif request_id in self._aborts:  # the client left meanwhile: end it here
                self._aborts.discard(request_id)
                self._owner.pop(request_id, None)
                src.abort_lost(request_id)
            else:
                self._spawn(self._resume(request_id, order.src))
        except MigrationTimeout as exc:
            self.stats.failed += 1
            self.stats.timeouts += 1
            logger.warning("migration of %s from replica %d to %d: %s", request_id, order.src, order.dst, exc)
        except Exception:  # noqa: BLE001 - the request stayed at the source; counted and logged
            self.stats.failed += 1
            logger.exception("migration of %s from replica %d to %d failed", request_id, order.src, order.dst)
        finally:
            del self._moving[request_id]
            if request_id in self._aborts:
                self._aborts.discard(request_id)
                self.abort(request_id)
        return moved

def sum_metrics(snapshots: Seq[EngineMetrics]) -> EngineMetrics:
    """Several replicas' snapshots as one: counts added, the slowest last step, mean hit rate."""
    total = {}
    for field in dataclasses.fields(EngineMetrics):
        values = [getattr(m, field.name) for m in snapshots]
        if field.name == "context_lengths":
            total[field.name] = {k: v for m in values for k, v in m.items()}
        elif field.name == "requests":
            total[field.name] = tuple(r for m in values for r in m)
        elif field.name == "page_size":
            total[field.name] = values[0]
        elif field.name == "last_step_seconds":
            total[field.name] = max(values)
        elif field.name == "prefix_cache_hit_rate":
            total[field.name] = sum(values) / len(values)
        else:
            total[field.name] = sum(values)
    return EngineMetrics(**total)
