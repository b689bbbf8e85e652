"""Moving a running request between two replicas' engines, driven from the cluster's event loop.

Live migration (the default) pre-copies the request's complete KV pages while the source keeps
decoding, then stops it at the source for a short stop-and-copy of the rest and commits it at the
destination; the recompute variant moves only the tokens and the destination prefills them again
(the cost model picks the cheaper one under ``auto``). Every engine-side call runs on the thread
that owns that engine (``AsyncEngine.call``) through the engine's migration port
(jaxinfer.engine.migration_port). A move that fails at any point leaves the request running on
exactly one replica: the source until the destination has committed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from jaxinfer.engine.async_engine import AsyncEngine

if TYPE_CHECKING:
    from collections.abc import Callable

    from jaxinfer.router.cost_model import CostModel


class RequestGone(Exception):
    """The request finished, was aborted or was preempted at the source: nothing to move."""


@dataclasses.dataclass
class MigrationStats:
    started: int = 0
    completed: int = 0
    live: int = 0
    recompute: int = 0
    refused: int = 0  # the destination had no room
    gone: int = 0  # the request finished or stopped running first
    failed: int = 0  # an error; the request stayed at the source
    pages_copied: int = 0
    pause_seconds: float = 0.0  # stop-and-copy time summed over completed migrations

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def migration_mode(configured: str, cost_model: CostModel | None, context_len: int) -> str:
    """'live' or 'recompute' for a request of ``context_len`` tokens; ``auto`` asks the cost model
    (live without one)."""
    if configured != "auto":
        return configured
    if cost_model is None:
        return "live"
    cheaper = cost_model.recompute_seconds(context_len) < cost_model.transfer_seconds(context_len)
    return "recompute" if cheaper else "live"


async def move_request(request_id: str, src: AsyncEngine, dst: AsyncEngine, *, mode: Callable[[int], str],
                       stats: MigrationStats, precopy_rounds: int, last_round_pages: int) -> bool:
    """Move the request from ``src`` to ``dst``: True once it runs at ``dst``, False if ``dst`` had no
    room; raises RequestGone if it stopped running at ``src`` first (any other error: it stays at
    ``src``). ``mode`` picks 'live' or 'recompute' from the request's context length."""
    info = await src.call(lambda a: a.engine.migration.stable_pages(request_id))
    if info is None:
        raise RequestGone
    stable, context_len, preemptions = info
    chosen = mode(context_len)
    page_size = dst.engine.block_manager.page_size
    target = dst.engine.runner.kv_sharding if chosen == "live" else None
    reserve = context_len + page_size if chosen == "live" else 0
    if not await dst.call(lambda a: a.engine.migration.reserve(request_id, reserve)):
        stats.refused += 1
        return False
    try:
        sent = 0
        for _ in range(precopy_rounds if chosen == "live" else 0):
            if stable - sent <= last_round_pages:
                break
            payload = await src.call(lambda a, s=sent, e=stable: a.engine.migration.export(request_id, s, e, target))
            if payload is None:
                raise RequestGone
            await dst.call(lambda a, s=sent, e=stable, p=payload: a.engine.migration.receive(request_id, s, e - s, p))
            stats.pages_copied += stable - sent
            sent = stable
            info = await src.call(lambda a: a.engine.migration.stable_pages(request_id))
            if info is None:
                raise RequestGone
            stable = info[0]

        def detach(a: AsyncEngine):
            seq = a.engine.scheduler.find(request_id)
            if seq is None or seq.num_preemptions != preemptions:  # pre-copied KV is stale
                return None
            return a.detach(request_id, sent, target)
        paused = time.perf_counter()
        detached = await src.call(detach)
        if detached is None:
            raise RequestGone
        moving, stream = detached
        try:
            await dst.call(lambda a: a.commit(moving, stream))
        except BaseException:
            await src.call(lambda a: a.reattach(request_id, stream))
            raise
    except BaseException:
        if dst.alive:
            await dst.call(lambda a: a.engine.migration.cancel(request_id))
        raise
    stats.pause_seconds += time.perf_counter() - paused
    await src.call(lambda a: a.engine.migration.release(request_id))
    stats.pages_copied += max(moving.num_pages - sent, 0) if chosen == "live" else 0
    stats.completed += 1
    setattr(stats, chosen, getattr(stats, chosen) + 1)
    return True
