"""Length-agnostic routers to compare the cascade with, and ``make_router`` to pick one by name
(pure Python, no jax).

- round-robin: the next accepting replica in index order;
- least-loaded: the lowest virtual KV usage (used + waiting pages), ties to the shorter queue;
- llumnix: Llumnix's default policies (AlibabaPAI/llumnix): dispatch to the freest replica by
  ``(free pages - waiting pages) / requests`` (its "remaining steps"), and every tick its balancing
  migrations (jaxinfer.router.balance), one migration in flight per replica.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxinfer.router.balance import balance_moves, freeness
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
        orders = balance_moves(free, self.gap_pages)
        self.num_migrations += len(orders)
        return orders

    def describe(self) -> dict:
        return {"router": self.name, "migrations": self.num_migrations}


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
