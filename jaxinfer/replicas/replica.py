"""A replica group as the cluster sees it: requests in, a stream of outputs per request, a load
snapshot, and the migration port's steps as awaitables (no closures cross it, so a replica can live
in another process). ``LocalReplica`` is an engine in this process, behind its AsyncEngine;
``jaxinfer.replicas.ray_replica.RayReplica`` is one in a Ray actor, possibly on another host.

Migration steps (jaxinfer.engine.migration_port): source ``stable_pages``, ``export``,
``detach_request`` (stop it, keep its pages), then ``release_request`` or ``reattach_request``;
destination ``reserve``, ``receive``, ``commit_request`` or ``cancel_arrival``. ``kv_target()`` is
what the source's ``export``/``detach_request`` are given for a live move to this replica: where the
pages should land (this process: the destination's devices; another process: host memory).
"""

from __future__ import annotations

from jaxinfer.engine.async_engine import AsyncEngine, RequestStream


class LocalReplica(AsyncEngine):
    """An engine in this process, with its own loop thread."""

    remote = False  # its steps are calls into this process: never lost, so no deadlines
    @property
    def page_size(self) -> int:
        return self.engine.block_manager.page_size

    def kv_target(self):
        """Live pages for this replica are copied straight onto its devices."""
        return self.engine.runner.kv_sharding

    # -- source --------------------------------------------------------------------------------------

    async def stable_pages(self, request_id: str) -> tuple[int, int, int] | None:
        return await self.call(lambda a: a.engine.migration.stable_pages(request_id))

    async def export(self, request_id: str, start: int, stop: int, target):
        return await self.call(lambda a: a.engine.migration.export(request_id, start, stop, target))

    async def detach_request(self, request_id: str, first_page: int, target, preemptions: int,
                             hold_seconds: float | None = None):
        """Stop the request for a move: (its MovingRequest, its stream), or None if it stopped
        running or was preempted since ``stable_pages`` said ``preemptions`` (pre-copied KV is stale).
        Past ``hold_seconds`` without a release or reattach its pages are freed."""
        def detach(a: AsyncEngine):
            seq = a.engine.scheduler.find(request_id)
            if seq is None or seq.num_preemptions != preemptions:
                return None
            return a.detach(request_id, first_page, target, hold_seconds)
        return await self.call(detach)

    async def reattach_request(self, request_id: str, stream: RequestStream | None) -> bool:
        """Resume it here after a failed move; False if it is gone (its hold ran out)."""
        return await self.call(lambda a: a.reattach(request_id, stream))

    async def release_request(self, request_id: str) -> None:
        await self.call(lambda a: a.engine.migration.release(request_id))

    # -- destination ---------------------------------------------------------------------------------

    async def reserve(self, request_id: str, num_tokens: int, hold_seconds: float | None = None) -> bool:
        return await self.call(lambda a: a.engine.migration.reserve(request_id, num_tokens, hold_seconds))

    async def receive(self, request_id: str, start: int, count: int, payload) -> None:
        await self.call(lambda a: a.engine.migration.receive(request_id, start, count, payload))

    async def commit_request(self, moving, stream: RequestStream | None) -> None:
        await self.call(lambda a: a.commit(moving, stream))

    async def cancel_arrival(self, request_id: str) -> None:
        await self.call(lambda a: a.engine.migration.cancel(request_id))

    async def holds(self, request_id: str) -> bool:
        """Whether the request runs (or waits) here: after a commit whose outcome is unknown."""
        return await self.call(lambda a: a.engine.has_stream(request_id))
