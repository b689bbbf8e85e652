"""Moving a running request between two replicas' engines, driven from the cluster's event loop.

Live migration (the default) pre-copies the request's complete KV pages while the source keeps
decoding, then stops it at the source for a short stop-and-copy of the rest and commits it at the
destination; the recompute variant moves only the tokens and the destination prefills them again
(the cost model picks the cheaper one under ``auto``). The steps are the replicas' awaitables
(jaxinfer.replicas.replica), each run where that engine lives, through its migration port
(jaxinfer.engine.migration_port). A move that fails at any point leaves the request running on
exactly one replica: the source until the destination has committed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from jaxinfer.replicas.replica import LocalReplica as Replica  # or a RayReplica: the same steps
    from jaxinfer.router.cost_model import CostModel


logger = logging.getLogger(__name__)


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


async def move_request(request_id: str, src: Replica, dst: Replica, *, mode: Callable[[int], str],
                       stats: MigrationStats, precopy_rounds: int, last_round_pages: int) -> bool:
    """Move the request from ``src`` to ``dst``: True once it runs at ``dst``, False if ``dst`` had no
    room; raises RequestGone if it stopped running at ``src`` first (any other error: it stays at
    ``src``). ``mode`` picks 'live' or 'recompute' from the request's context length."""
    info = await src.stable_pages(request_id)
    if info is None:
        raise RequestGone
    stable, context_len, preemptions = info
    chosen = mode(context_len)
    target = dst.kv_target() if chosen == "live" else None
    reserve = context_len + dst.page_size if chosen == "live" else 0
    if not await dst.reserve(request_id, reserve):
        stats.refused += 1
        return False
    try:
        sent = 0
        for _ in range(precopy_rounds if chosen == "live" else 0):
            if stable - sent <= last_round_pages:
                break
            payload = await src.export(request_id, sent, stable, target)
            if payload is None:
                raise RequestGone
            await dst.receive(request_id, sent, stable - sent, payload)
            stats.pages_copied += stable - sent
            sent = stable
            info = await src.stable_pages(request_id)
            if info is None:
                raise RequestGone
            stable = info[0]
        paused = time.perf_counter()
        detached = await src.detach_request(request_id, sent, target, preemptions)
        if detached is None:
            raise RequestGone
        moving, stream = detached
        try:
            await dst.commit_request(moving, stream)
        except BaseException:
            # a commit whose reply was lost may have happened: one running copy, never two
            if not (dst.alive and await _holds(dst, request_id)):
                await src.reattach_request(request_id, stream)
                raise
    except BaseException:
        if dst.alive:
            await dst.cancel_arrival(request_id)
        raise
    stats.pause_seconds += time.perf_counter() - paused
    try:
        await src.release_request(request_id)
    except Exception:  # noqa: BLE001 - the request runs at dst; the source (or its process) keeps the pages
        logger.exception("release of %s at the source failed after the move", request_id)
    stats.pages_copied += max(moving.num_pages - sent, 0) if chosen == "live" else 0
    stats.completed += 1
    setattr(stats, chosen, getattr(stats, chosen) + 1)
    return True


async def _holds(replica: Replica, request_id: str) -> bool:
    try:
        return await replica.holds(request_id)
    except Exception:  # noqa: BLE001 - cannot tell: it does not count as holding it
        return False

