"""Moving a running request between two replicas' engines (both in this process).

Live migration (the default) copies the request's KV pages while the source keeps decoding
(pre-copy of the pages that are complete), then stops the request at the source for a short
stop-and-copy of the rest and commits it at the destination. The recompute variant moves only the
tokens: the destination prefills them again. Either way the request is running on exactly one
replica at every step boundary, and its token stream continues where it stopped.

Source side: ``stable_pages``, ``export``, ``detach`` (stop, keep pages), then ``release`` (after
the destination committed) or ``reattach`` (it failed). Destination side: ``reserve`` (slot and
pages up front), ``receive`` (pre-copied pages), ``commit`` or ``cancel``. Every call runs on the
thread that owns that engine.

A reservation and a detached request can be given a hold time: past it, ``expire`` (the engine's
loop calls it) gives their pages back, so a migration whose driver went silent (its process or its
link died between two steps) leaves nothing held for ever.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jaxinfer.engine.request_output import TextStream
from jaxinfer.engine.sequence import Sequence, SequenceStatus


class MigrationError(RuntimeError):
    """A migration step could not be carried out (the request stays where it was)."""


# host fields of a Sequence that travel with it (pages, slot and status are per replica)
_CARRIED = ("prompt_ids", "output_ids", "params", "num_computed", "num_cached", "arrival_time", "first_scheduled_time",
            "first_token_time", "num_preemptions", "logprobs", "cache_salt", "resumed_at")


@dataclasses.dataclass
class MovingRequest:
    """A request stopped at its source: its host state, the stream that renders its text and (live
    migration) the KV of its pages from ``first_page`` on, already on the destination's devices."""

    seq: Sequence
    stream: TextStream
    slot_rows: tuple[np.ndarray, ...] | None  # penalty history (and draft feature) of its slot
    payload: object | None  # export_pages payload of the unsent pages; None: recompute
    first_page: int
    num_pages: int  # pages the request's computed tokens fill


class MigrationPort:
    """An engine's two ends of migrations: requests leaving it and requests arriving."""

    def __init__(self, engine):
        self.engine = engine
        self.detached: dict[str, tuple[Sequence, TextStream]] = {}  # stopped here, not yet released
        self.incoming: dict[str, tuple[Sequence, int]] = {}  # reserved here: (shell holding pages, slot)
        self._until: dict[tuple[bool, str], float] = {}  # (incoming?, request id) -> hold deadline (monotonic)

    @property
    def holding(self) -> bool:
        """Whether anything here has a hold deadline (``expire`` has work)."""
        return bool(self._until)

    def _hold(self, incoming: bool, request_id: str, seconds: float | None) -> None:
        if seconds is not None:
            self._until[incoming, request_id] = time.monotonic() + seconds

    def expire(self, now: float | None = None) -> list[str]:
        """Give back what is held past its deadline: reservations are cancelled, detached requests
        released (their driver resumes them from its own record, or has committed them elsewhere).
        Returns the request ids."""
        now = time.monotonic() if now is None else now
        gone = [key for key, until in self._until.items() if until <= now]
        for incoming, request_id in gone:
            if incoming:
                self.cancel(request_id)
            else:
                self.release(request_id)
        return [request_id for _, request_id in gone]

    # -- source ---------------------------------------------------------------------------------

    def _running(self, request_id: str) -> Sequence | None:
        # a burst still running would change the request under us: collect it first (its outputs go
        # out with the next step; AsyncEngine settles before any call, so none are pending there)
        self.engine.settle(keep=True)
        seq = self.engine.scheduler.find(request_id)
        return seq if seq is not None and seq.status is SequenceStatus.RUNNING else None

    def stable_pages(self, request_id: str) -> tuple[int, int, int] | None:
        """(full pages whose KV is final, current context length, preemptions so far) of a running
        request; None if it is not running here."""
        seq = self._running(request_id)
        if seq is None:
            return None
        return (min(seq.num_computed // self.engine.block_manager.page_size, len(seq.pages)), seq.num_tokens,
                seq.num_preemptions)

    def export(self, request_id: str, start: int, stop: int, destination: jax.sharding.Sharding):
        """Pre-copy: the KV of pages [start, stop) of a running request, on ``destination``."""
        seq = self._running(request_id)
        if seq is None:
            return None
        return self.engine.runner.export_pages(seq.pages[start:stop], destination)

    def detach(self, request_id: str, first_page: int, destination: jax.sharding.Sharding | None,
               hold_seconds: float | None = None) -> MovingRequest | None:
        """Stop the request here (it keeps its pages and slot until ``release``, or ``hold_seconds``)
        and hand over its state and, with a destination, the KV of its pages from ``first_page`` on.
        None if it is not here or not running (finished, aborted, preempted)."""
        engine = self.engine
        seq = self._running(request_id)
        if seq is None or not engine.has_stream(request_id):
            return None
        num_pages = engine.block_manager.pages_needed(seq.num_computed)
        payload = None
        if destination is not None:
            payload = engine.runner.export_pages(seq.pages[first_page:num_pages], destination)
        slot_rows = engine.runner.export_slot(seq.slot) if destination is not None else None
        engine.scheduler.detach(seq)
        stream = engine.take_stream(request_id)
        self.detached[request_id] = (seq, stream)
        self._hold(False, request_id, hold_seconds)
        copy = Sequence(request_id, seq.prompt_ids, seq.params)
        for name in _CARRIED:
            setattr(copy, name, getattr(seq, name))
        copy.output_ids, copy.logprobs = list(seq.output_ids), list(seq.logprobs)
        return MovingRequest(copy, stream, slot_rows, payload, first_page, num_pages)

    def release(self, request_id: str) -> None:
        """The destination has the request: free its pages and slot here (if its hold has not)."""
        self._until.pop((False, request_id), None)
        entry = self.detached.pop(request_id, None)
        if entry is not None:
            self.engine.scheduler.release(entry[0])

    def reattach(self, request_id: str) -> bool:
        """The migration failed after ``detach``: the request resumes here as if never stopped.
        True if it runs here (also when it was never detached); False if it is gone (its hold
        expired, or it finished before the detach)."""
        self._until.pop((False, request_id), None)
        entry = self.detached.pop(request_id, None)
        if entry is None:
            return self.engine.has_stream(request_id)
        seq, stream = entry
        self.engine.scheduler.reattach(seq)
        self.engine.give_stream(request_id, stream)
        return True

    # -- destination ----------------------------------------------------------------------------

    def reserve(self, request_id: str, num_tokens: int, hold_seconds: float | None = None) -> bool:
        """Take a slot and pages for ``num_tokens`` tokens of an arriving request (for ``hold_seconds``
        if given: then they go back unless committed); False if they are not free (the migration is
        then called off)."""
        engine = self.engine
        if engine.has_stream(request_id) or request_id in self.incoming:
            raise MigrationError(f"request {request_id!r} is already on this replica")
        reserved = engine.scheduler.reserve_arrival(request_id, num_tokens)
        if reserved is None:
            return False
        self.incoming[request_id] = reserved
        self._hold(True, request_id, hold_seconds)
        return True

    def receive(self, request_id: str, start: int, count: int, payload) -> None:
        """Write pre-copied pages [start, start + count) of an arriving request."""
        shell, _ = self._arrival(request_id)
        if not self.engine.scheduler.grow_arrival(shell, start + count):
            raise MigrationError(f"no free KV pages for pages {start}..{start + count} of {request_id!r}")
        self.engine.runner.import_pages(shell.pages[start:start + count], payload)

    def commit(self, moving: MovingRequest) -> None:
        """Install the arriving request and let it run here (raises MigrationError, having changed
        nothing but its reservation, if the pages it needs now are not free)."""
        engine = self.engine
        request_id = moving.seq.request_id
        if moving.payload is None:  # recompute: the request waits for its prefill like a preempted one
            self.cancel(request_id)
            engine.scheduler.requeue(moving.seq)
            engine.give_stream(request_id, moving.stream)
            return
        shell, slot = self._arrival(request_id)
        if not engine.scheduler.grow_arrival(shell, moving.num_pages):
            raise MigrationError(f"{moving.num_pages - len(shell.pages)} more KV pages needed for {request_id!r}, "
                                 f"{engine.block_manager.num_free} free")
        engine.runner.import_pages(shell.pages[moving.first_page:moving.num_pages], moving.payload)
        engine.runner.import_slot(slot, moving.slot_rows)
        del self.incoming[request_id]
        self._until.pop((True, request_id), None)
        engine.scheduler.attach(moving.seq, shell, slot, moving.num_pages)
        engine.give_stream(request_id, moving.stream)

    def _arrival(self, request_id: str) -> tuple[Sequence, int]:
        try:
            return self.incoming[request_id]
        except KeyError:
            raise MigrationError(f"no reservation for {request_id!r} here (called off, or its hold expired)") from None

    def cancel(self, request_id: str) -> None:
        """Call off an arrival: return its reserved pages and slot."""
        self._until.pop((True, request_id), None)
        entry = self.incoming.pop(request_id, None)
        if entry is not None:
            self.engine.scheduler.cancel_arrival(*entry)
