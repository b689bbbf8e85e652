"""Moving a running request between two replicas' engines, driven from the cluster's event loop.

Live migration (the default) pre-copies the request's complete KV pages while the source keeps
decoding, then stops it at the source for a short stop-and-copy of the rest and commits it at the
destination; the recompute variant moves only the tokens and the destination prefills them again
(the cost model picks the cheaper one under ``auto``). The steps are the replicas' awaitables
(jaxinfer.replicas.replica), each run where that engine lives, through its migration port
(jaxinfer.engine.migration_port). A move that fails at any point leaves the request running on
exactly one replica: the source until the destination has committed.

Between processes (a RayReplica at either end) every step has a deadline, and what a step sets
aside is held only for ``hold_seconds`` (the destination's reservation, the source's detached
request), so a driver that goes silent leaves nothing held. A request stopped at its source whose
reattach fails (its replica died, or its hold ran out) is orphaned: the caller resumes it from its
stream.
"""

from __future__ import annotations

import asyncio
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


class MigrationTimeout(TimeoutError):
    """A migration step did not answer within its deadline."""


class RequestOrphaned(Exception):
    """The move failed after the source stopped the request, and the source could not take it back:
    no replica runs it. ``stream``: its stream when it lives in this process (None: in a StreamTable)."""

    def __init__(self, request_id: str, stream, cause: BaseException | None = None):
        super().__init__(f"request {request_id!r} was stopped for a move and could not be resumed at its source"
                         + (f" ({type(cause).__name__}: {cause})" if cause is not None else ""))
        self.request_id, self.stream = request_id, stream


@dataclasses.dataclass
class MigrationStats:
    started: int = 0
    completed: int = 0
    live: int = 0
    recompute: int = 0
    refused: int = 0  # the destination had no room
    gone: int = 0  # the request finished or stopped running first
    failed: int = 0  # an error; the request stayed at the source (or was resumed from its stream)
    timeouts: int = 0  # failures that were a step's deadline
    pages_copied: int = 0
    pause_seconds: float = 0.0  # stop-and-copy time summed over completed migrations

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def migration_mode(configured: str, cost_model: CostModel | None, context_len: int,
                   bytes_per_second: float | None = None) -> str:
    """'live' or 'recompute' for a request of ``context_len`` tokens; ``auto`` asks the cost model
    (live without one), with the link's measured bandwidth if given."""
    if configured != "auto":
        return configured
    if cost_model is None:
        return "live"
    cheaper = cost_model.recompute_seconds(context_len) < cost_model.transfer_seconds(context_len, bytes_per_second)
    return "recompute" if cheaper else "live"


async def move_request(request_id: str, src: Replica, dst: Replica, *, mode: Callable[[int], str],
                       stats: MigrationStats, precopy_rounds: int, last_round_pages: int,
                       deadline: float | None = None, hold_seconds: float | None = None) -> bool:
    """Move the request from ``src`` to ``dst``: True once it runs at ``dst``, False if ``dst`` had no
    room; raises RequestGone if it stopped running at ``src`` first, RequestOrphaned if it was
    stopped and could not be taken back (any other error, MigrationTimeout when a step took over
    ``deadline`` seconds: it runs at ``src``). ``mode`` picks 'live' or 'recompute' from the
    request's context length; ``hold_seconds``: how long each end keeps what a step set aside."""

    async def step(name: str, awaitable):
        if deadline is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, deadline)
        except TimeoutError:
            raise MigrationTimeout(f"{name} of {request_id!r} took over {deadline:g} s") from None

    info = await step("stable_pages", src.stable_pages(request_id))
    if info is None:
        raise RequestGone
    stable, context_len, preemptions = info
    chosen = mode(context_len)
    target = dst.kv_target() if chosen == "live" else None
    reserve = context_len + dst.page_size if chosen == "live" else 0
    if not await step("reserve", dst.reserve(request_id, reserve, hold_seconds)):
        stats.refused += 1
        return False
    try:
        sent = 0
        for _ in range(precopy_rounds if chosen == "live" else 0):
            if stable - sent <= last_round_pages:
                break
            payload = await step("export", src.export(request_id, sent, stable, target))
            if payload is None:
                raise RequestGone
            await step("receive", dst.receive(request_id, sent, stable - sent, payload))
            stats.pages_copied += stable - sent
            sent = stable
            info = await step("stable_pages", src.stable_pages(request_id))
            if info is None:
                raise RequestGone
            stable = info[0]
        paused = time.perf_counter()
        try:
            detached = await step("detach", src.detach_request(request_id, sent, target, preemptions, hold_seconds))
        except BaseException as exc:  # it may have been stopped all the same: take it back
            await _take_back(request_id, src, None, step, exc)
            raise
        if detached is None:
            raise RequestGone
        moving, stream = detached
        try:
            await step("commit", dst.commit_request(moving, stream))
        except BaseException as exc:
            # a commit whose reply was lost may have happened: one running copy, never two
            if dst.alive and await _holds(dst, request_id, step):
                logger.warning("commit of %s at the destination failed but it runs there", request_id)
            else:
                if dst.alive:
                    dst.abort(request_id)  # a commit still on its way must not leave a copy running there
                await _take_back(request_id, src, stream, step, exc)
                raise
    except BaseException:
        if dst.alive:
            try:
                await step("cancel_arrival", dst.cancel_arrival(request_id))
            except Exception:  # noqa: BLE001 - the destination's hold gives the pages back
                logger.exception("cancel of %s's arrival failed", request_id)
        raise
    stats.pause_seconds += time.perf_counter() - paused
    try:
        await step("release", src.release_request(request_id))
    except Exception:  # noqa: BLE001 - the request runs at dst; the source's hold frees its pages
        logger.exception("release of %s at the source failed after the move", request_id)
    stats.pages_copied += max(moving.num_pages - sent, 0) if chosen == "live" else 0
    stats.completed += 1
    setattr(stats, chosen, getattr(stats, chosen) + 1)
    return True


async def _take_back(request_id: str, src: Replica, stream, step, cause: BaseException) -> None:
    """Resume the request at its source after a failed move; raises RequestOrphaned if it cannot."""
    try:
        if await step("reattach", src.reattach_request(request_id, stream)):
            return
        cause = None
        # gone (its stream closed: it may have finished at the destination after all; or its hold
        # ran out): whatever the source still holds of it goes
        await step("release", src.release_request(request_id))
    except Exception as exc:  # noqa: BLE001 - reported through RequestOrphaned
        cause = exc
    raise RequestOrphaned(request_id, stream, cause)


async def _holds(replica: Replica, request_id: str, step) -> bool:
    try:
        return await step("holds", replica.holds(request_id))
    except Exception:  # noqa: BLE001 - cannot tell: it does not count as holding it
        return False

