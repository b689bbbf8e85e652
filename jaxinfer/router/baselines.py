"""Length-agnostic routers to compare the cascade with, and ``make_router`` to pick one by name
(pure Python, no jax).

- round-robin: the next accepting replica in index order;
- least-loaded: the lowest virtual KV usage (used + waiting pages), ties to the shorter queue;
- llumnix: Llumnix's default policies (AlibabaPAI/llumnix): dispatch to the freest replica by
  ``(free pages - waiting pages) / requests`` (its "remaining steps"), and every tick pair the least
  free replicas with the freest ones while the gap exceeds a threshold, moving the source's
  shortest running request when that narrows the gap without reversing it (one migration in flight
  per replica).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxinfer.router.base import Migration, NewRequest, ReplicaLoad, Router, accepting
from jaxinfer.router.cascade import CascadeRouter
from jaxinfer.router.cost_model import CostModel


class RoundRobinRouter(Router):
    name = "round-robin"

    def __init__(self):
        self._next = 0

    def dispatch(self, request: NewRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        live = sorted(accepting(replicas), key=lambda r: r.replica)
        chosen = next((r for r in live if r.replica >= self._next), live[0])
        self._next = chosen.replica + 1
        return chosen.replica


class LeastLoadedRouter(Router):
    name = "least-loaded"

    def dispatch(self, request: NewRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        return min(accepting(replicas), key=lambda r: (r.usage, r.num_waiting, r.replica)).replica


def freeness(r: ReplicaLoad) -> float:
    """Llumnix's remaining-steps load metric, in pages per request; higher is freer."""
    free = r.kv_pages_total - r.kv_pages_used - r.waiting_pages
    return free / max(len(r.requests), 1)


class LlumnixRouter(Router):
    name = "llumnix"

    def __init__(self, *, interval: float = 0.1, gap_pages: float = 3.0, max_concurrent: int = 1):
        """gap_pages: the freeness gap (pages per request) a source/destination pair must exceed."""
        if interval <= 0 or gap_pages < 0 or max_concurrent < 1:
            raise ValueError(f"need interval > 0, gap_pages >= 0, max_concurrent >= 1, got {interval}, "
                             f"{gap_pages}, {max_concurrent}")
        self.interval, self.gap_pages, self.max_concurrent = interval, gap_pages, max_concurrent
        self.num_migrations = 0

    def dispatch(self, request: NewRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        return max(accepting(replicas), key=lambda r: (freeness(r), -r.replica)).replica

    def rebalance(self, replicas: Sequence[ReplicaLoad], now: float) -> list[Migration]:
        free = [r for r in accepting(replicas) if r.migrations_in_flight < self.max_concurrent]
        order = sorted(free, key=lambda r: (freeness(r), r.replica))
        orders = []
        lo, hi = 0, len(order) - 1  # lo: least free (source), hi: freest (destination)
        while lo < hi:
            src, dst = order[lo], order[hi]
            if freeness(dst) - freeness(src) <= self.gap_pages:
                break
            running = [q for q in src.requests if q.running and not q.migrating]
            if running:
                req = min(running, key=lambda q: (q.context_len, q.request_id))
                if _improves(src, dst, req):
                    orders.append(Migration(req.request_id, src.replica, dst.replica, "balance"))
            lo, hi = lo + 1, hi - 1
        self.num_migrations += len(orders)
        return orders

    def describe(self) -> dict:
        return {"router": self.name, "migrations": self.num_migrations}


def _improves(src: ReplicaLoad, dst: ReplicaLoad, req) -> bool:
    """Llumnix's 'balanced' pair check: after the move the destination is still the freer one, by
    less than before (no overshoot, so no ping-pong)."""
    pages = -(-req.context_len // src.page_size)
    free_src = (src.kv_pages_total - src.kv_pages_used - src.waiting_pages + pages) / max(len(src.requests) - 1, 1)
    free_dst = (dst.kv_pages_total - dst.kv_pages_used - dst.waiting_pages - pages) / (len(dst.requests) + 1)
    return 0 <= free_dst - free_src < freeness(dst) - freeness(src)


ROUTERS = ("cascade", "round-robin", "least-loaded", "llumnix")


def make_router(name: str, num_replicas: int, cost_model: CostModel, max_len: int, **kw) -> Router:
    """A router by name; ``kw`` goes to its constructor (the cascade's plan, grid, config fields...)."""
    if name == "cascade":
        return CascadeRouter(num_replicas, cost_model, max_len, **kw)
    if name == "round-robin":
        return RoundRobinRouter(**kw)
    if name == "least-loaded":
        return LeastLoadedRouter(**kw)
    if name == "llumnix":
        return LlumnixRouter(**kw)
    raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
