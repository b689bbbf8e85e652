"""What a router sees and what it decides (pure Python, no jax).

The cluster (real replicas) and the simulator (simulated replicas) both hand a router the same
snapshots and carry out the same orders, so every router runs unchanged in both:

- ``dispatch(request, replicas, now)`` picks the replica of a new request;
- ``rebalance(replicas, now)`` is called every ``interval`` seconds and returns migration orders;
- ``on_finish(...)`` reports a finished request (the length history the stage plan is fit to).

A replica that is draining or dead has ``accepting=False``: it receives neither new requests nor
migrations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# how a request moves between replicas: its KV pages copied (live), recomputed from its tokens at the
# destination (recompute), or whichever the cost model says is cheaper (auto)
MIGRATION_MODES = ("auto", "live", "recompute")


@dataclasses.dataclass(frozen=True)
class RequestLoad:
    """One request on a replica, as the router sees it."""

    request_id: str
    prompt_len: int
    context_len: int  # the routing length: prompt + tokens generated so far
    max_tokens: int
    running: bool  # admitted (has KV pages); False while it waits in the queue
    migrating: bool = False  # a migration of it is in flight

    @property
    def generated(self) -> int:
        return self.context_len - self.prompt_len


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """A snapshot of one replica."""

    replica: int
    requests: tuple[RequestLoad, ...]
    kv_pages_used: int
    kv_pages_total: int
    page_size: int
    waiting_pages: int = 0  # pages the waiting requests will need on admission
    migrations_in_flight: int = 0  # in or out
    accepting: bool = True
    step_seconds: float = 0.0  # the last step's duration

    @property
    def num_running(self) -> int:
        return sum(r.running for r in self.requests)

    @property
    def num_waiting(self) -> int:
        return sum(not r.running for r in self.requests)

    @property
    def usage(self) -> float:
        """Virtual KV usage (Llumnix's 'virtual usage'): used plus demanded pages over the pool."""
        return (self.kv_pages_used + self.waiting_pages) / max(self.kv_pages_total, 1)

    @property
    def max_context(self) -> int:
        return max((r.context_len for r in self.requests), default=0)


@dataclasses.dataclass(frozen=True)
class NewRequest:
    request_id: str
    prompt_len: int
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class Migration:
    """An order: move ``request_id`` from replica ``src`` to ``dst``."""

    request_id: str
    src: int
    dst: int
    reason: str  # "handoff" (outgrew its stage), "balance" (load within a stage or across replicas)


class Router:
    """Base class: subclasses implement ``dispatch``; the rest defaults to doing nothing."""

    name = "router"
    interval = 0.1  # seconds between rebalance calls

    def dispatch(self, request: NewRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        raise NotImplementedError

    def rebalance(self, replicas: Sequence[ReplicaLoad], now: float) -> list[Migration]:
        return []

    def on_finish(self, request_id: str, prompt_len: int, output_len: int, now: float) -> None:
        pass

    def set_members(self, replicas: Sequence[int]) -> None:
        """The replicas that are up changed (one was lost, or came back): ``replicas``, the indices of
        those up. Routers that only read ``accepting`` need nothing here."""

    def describe(self) -> dict:
        """JSON-able state for Stats, /metrics and the admin API."""
        return {"router": self.name}

    def close(self) -> None:
        """Release what the router holds (a worker thread); the cluster calls it on shutdown."""


def accepting(replicas: Sequence[ReplicaLoad]) -> list[ReplicaLoad]:
    """The replicas that may take work; raises if there is none."""
    live = [r for r in replicas if r.accepting]
    if not live:
        raise RuntimeError("no replica is accepting requests")
    return live
