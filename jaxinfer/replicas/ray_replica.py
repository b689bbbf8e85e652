"""Replica groups in Ray actors, possibly on other hosts (``serve --cluster ray``; needs the
``jaxinfer[cluster]`` extra, and only this module imports ray).

- ``ReplicaWorker`` is the actor: an engine built in the actor's process by the ``make_engine``
  callable it is given, behind a LocalReplica, with the migration steps as actor methods and one
  streaming method, ``outputs``, that sends every step's RequestOutputs (and the load snapshot) as
  they come.
- ``RayReplica`` is its handle in the serving process: the LocalReplica surface the Cluster and the
  migration code use (jaxinfer.replicas.replica), so one Cluster and one router drive either kind.
- Streams stay in the serving process (``StreamTable``): a request's RequestStream never moves, and
  the table puts each output in token order whichever replica sent it, so outputs a source sent
  before a move and those its destination sends after it can arrive in any order. Every placement
  of a request on a replica (new, moved in, reattached, resumed) is a new lease; outputs carry
  their lease, and a superseded lease's outputs count only up to the token where it was
  superseded: a stale owner (a lost replica that was not dead after all, a commit that landed after
  its move was called off) cannot add or repeat a token.
- A replica whose actor dies is lost (its requests resume elsewhere); if Ray restarts the actor
  (``max_restarts``), the handle sees it answer again and the replica rejoins, empty.
- KV pages move by pull, in the way the destination asks for (its ``kv_target``, a transport of
  jaxinfer.replicas.transport): ``host`` pages through Ray's object store (the source returns host
  arrays, the destination's ``receive`` takes the object reference, so the bytes go actor to actor)
  or ``jax`` (``jax.experimental.transfer``, device to device; only a ticket travels). The last
  round's pages travel inside the stopped request's state. The request's host state (token ids,
  sampling state, its detokenizer) travels pickled, without the tokenizer, which the destination
  binds again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq

import numpy as np
import ray

from jaxinfer.engine.async_engine import EngineDeadError, RequestStream
from jaxinfer.engine.client import EngineInfo
from jaxinfer.engine.engine import Engine, EngineMetrics
from jaxinfer.engine.migration_port import MovingRequest
from jaxinfer.engine.request_output import RequestMetrics, RequestOutput, TextStream
from jaxinfer.engine.sequence import FinishReason, Sequence
from jaxinfer.replicas.replica import LocalReplica
from jaxinfer.replicas.transport import TRANSPORTS, Ticket, make_transport
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class _Failed:
    """A request's stream failed on the replica (its engine stopped)."""

    request_id: str
    message: str


class _Sink:
    """Where a LocalReplica inside the actor puts a request's outputs: the actor's outbox, as
    (lease, output) pairs."""

    def __init__(self, request_id: str, outbox: asyncio.Queue, lease: int):
        self.request_id = request_id
        self.lease = lease
        self._outbox = outbox
        self._loop = asyncio.get_running_loop()

    def _put(self, item) -> bool:
        if isinstance(item, BaseException):
            item = _Failed(self.request_id, f"{type(item).__name__}: {item}")
        try:
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, (self.lease, item))
        except RuntimeError:  # the actor's loop is gone
            return False
        return True


class ReplicaWorker:
    """One replica group in a Ray actor (an async actor: its methods share one event loop)."""

    def __init__(self, make_engine: Callable[[], Engine | tuple[Engine, dict]], warm_up: bool = True):
        """make_engine: builds the engine here, or (engine, facts) whose facts ``describe`` passes on."""
        engine = make_engine()
        engine, self._facts = engine if isinstance(engine, tuple) else (engine, {})
        if warm_up:
            engine.warm_up(migration=True)
        self._replica = LocalReplica(engine)
        host = ray.util.get_node_ip_address()
        self._transports = {name: make_transport(name, host) for name in TRANSPORTS}
        self._outbox: asyncio.Queue | None = None
        self._detached: dict[str, _Sink] = {}  # stopped for a move: their sinks, for a reattach

    def _queue(self) -> asyncio.Queue:
        if self._outbox is None:
            self._outbox = asyncio.Queue()
        return self._outbox

    async def describe(self, tokenizer: bool = False) -> dict:
        """What the serving process needs: limits, the load snapshot, where it runs (and the tokenizer)."""
        engine = self._replica.engine
        return {**self._facts, **({"tokenizer": engine.tokenizer} if tokenizer else {}),
                "max_model_len": engine.info.max_model_len,
                "vocab_size": engine.info.vocab_size,
                "page_size": self._replica.page_size, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "metrics": self._replica.metrics}

    async def add(self, ids: list[int], params, request_id: str, lease: int) -> str:
        sink = _Sink(request_id, self._queue(), lease)
        stream = await self._replica.add_request(ids, params, request_id, stream=sink)
        return stream.request_id

    async def abort(self, request_id: str) -> None:
        self._replica.abort(request_id)

    async def outputs(self, poll_seconds: float = 0.05, heartbeat_seconds: float = 1.0):
        """Forever: ((lease, output) pairs, load snapshot, alive) whenever there are outputs or the
        snapshot changed, and at least every ``heartbeat_seconds`` (the reader's sign of life)."""
        outbox, last, sent = self._queue(), None, 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                batch = [await asyncio.wait_for(outbox.get(), poll_seconds)]
            except TimeoutError:
                batch = []
            while not outbox.empty():
                batch.append(outbox.get_nowait())
            metrics = self._replica.metrics
            if batch or metrics is not last or loop.time() - sent >= heartbeat_seconds:
                last, sent = metrics, loop.time()
                yield batch, metrics, self._replica.alive

    # -- migration: source ---------------------------------------------------------------------------

    async def stable_pages(self, request_id: str):
        return await self._replica.stable_pages(request_id)

    @ray.method(num_returns=2)
    async def export(self, request_id: str, start: int, stop: int, transport: str = "host",
                     hold_seconds: float | None = None):
        """(whether the request was running here, its pages [start, stop) sent by ``transport``)."""
        payload = await self._replica.export(request_id, start, stop, None)
        return payload is not None, self._transports[transport].send(payload, hold_seconds)

    async def detach_request(self, request_id: str, first_page: int, transport: str | None, preemptions: int,
                             hold_seconds: float | None = None):
        """Stop the request for a move; its pages from ``first_page`` on sent by ``transport`` (None:
        a recompute, no pages)."""
        target = self._replica.kv_target() if transport else None
        detached = await self._replica.detach_request(request_id, first_page, target, preemptions, hold_seconds)
        if detached is None:
            return None
        moving, sink = detached
        self._detached[request_id] = sink
        payload = self._transports[transport].send(moving.payload, hold_seconds) if transport else None
        return dataclasses.replace(moving, payload=payload)

    async def reattach_request(self, request_id: str, lease: int) -> bool:
        """Resume a request this replica detached, its outputs under ``lease`` from now on; False
        if it is gone (its hold expired)."""
        sink = self._detached.pop(request_id, None)
        if sink is not None:
            sink.lease = lease
        return await self._replica.reattach_request(request_id, sink)

    async def release_request(self, request_id: str) -> None:
        self._detached.pop(request_id, None)
        await self._replica.release_request(request_id)

    # -- migration: destination ----------------------------------------------------------------------

    async def reserve(self, request_id: str, num_tokens: int, hold_seconds: float | None = None) -> bool:
        return await self._replica.reserve(request_id, num_tokens, hold_seconds)

    async def _fetch(self, sent):
        """Arrays on this replica's devices from what a source sent (host arrays or a transfer ticket)."""
        if isinstance(sent, Ticket):
            return await asyncio.to_thread(self._transports["jax"].fetch, sent, self._replica.kv_target())
        return sent

    async def receive(self, request_id: str, start: int, count: int, payload) -> None:
        await self._replica.receive(request_id, start, count, await self._fetch(payload))

    async def commit_request(self, moving, lease: int) -> None:
        request_id = moving.seq.request_id
        if moving.payload is not None:
            moving = dataclasses.replace(moving, payload=await self._fetch(moving.payload))
        await self._replica.commit_request(moving, _Sink(request_id, self._queue(), lease))

    async def cancel_arrival(self, request_id: str) -> None:
        await self._replica.cancel_arrival(request_id)

    async def holds(self, request_id: str) -> bool:
        return await self._replica.holds(request_id)

    # -- link probe --------------------------------------------------------------------------------

    async def probe_payload(self, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes into this node's object store (the source end of a link probe)."""
        return np.ones(nbytes, np.uint8)

    async def pull(self, refs: list) -> float:
        """Seconds to fetch ``refs[0]`` here (the destination end of a link probe)."""
        start = time.perf_counter()
        await refs[0]
        return time.perf_counter() - start

    async def pool(self) -> dict:
        """KV pool and migration bookkeeping (for checks: nothing left behind)."""
        def read(a):
            blocks, port = a.engine.block_manager, a.engine.migration
            return {"num_pages": blocks.num_pages, "num_free": blocks.num_free, "unfinished": a.engine.has_unfinished,
                    "detached": sorted(port.detached), "incoming": sorted(port.incoming)}
        return await self._replica.call(read)

    async def reset(self) -> None:
        """Abort every request and migration here (a replica that rejoins: what it ran was resumed
        elsewhere while it could not be reached)."""
        def clear(a):
            port = a.engine.migration
            for request_id in list(port.incoming):
                port.cancel(request_id)
            for request_id in list(port.detached):
                port.release(request_id)
            for request in a.engine.metrics().requests:
                a.abort(request.request_id)
        self._detached.clear()
        await self._replica.call(clear)

    async def shutdown(self) -> None:
        self._replica.shutdown()


@dataclasses.dataclass
class _Entry:
    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams
    holder: int  # the replica the current lease is on
    lease: int = 0  # the current placement's lease
    base: int = 0  # output tokens the stream had when the current lease began
    superseded: dict[int, int] = dataclasses.field(default_factory=dict)  # old lease -> tokens it may deliver
    delivered: int = 0  # output tokens handed to the stream
    last: RequestOutput | None = None  # the latest output handed to the stream
    pending: dict[int, RequestOutput] = dataclasses.field(default_factory=dict)  # by first token index


class StreamTable:
    """The serving process's stream of every request on Ray replicas, fed in token order."""

    def __init__(self):
        self._entries: dict[str, _Entry] = {}
        self.on_finish: Callable[[RequestOutput], None] | None = None
        self.dropped = 0  # stale outputs (already delivered, or from a superseded lease)

    def open(self, request_id: str, owner, prompt_ids: list[int], params: SamplingParams,
             holder: int) -> RequestStream:
        stream = RequestStream(request_id, owner)
        self._entries[request_id] = _Entry(stream, list(prompt_ids), params, holder)
        return stream

    def place(self, request_id: str, holder: int, handover: int | None = None) -> int:
        """A new lease: the request runs on replica ``holder`` from output token ``handover`` on (None:
        from what the stream already has; outputs of the old lease waiting out of order are then
        dropped too). The old lease may deliver outputs up to that token. -1 if it is not open."""
        entry = self._entries.get(request_id)
        if entry is None:
            return -1
        limit = entry.delivered if handover is None else handover
        entry.superseded[entry.lease] = limit
        entry.pending = {start: o for start, o in entry.pending.items() if len(o.output_ids) <= limit}
        entry.lease, entry.holder, entry.base = entry.lease + 1, holder, limit
        return entry.lease

    def take_back(self, request_id: str, holder: int) -> int:
        """The lease for a request its source ``holder`` resumes after a failed move: unchanged if no
        other replica was given it, else a new one (the other's outputs all dropped). -1 if closed."""
        entry = self._entries.get(request_id)
        if entry is None:
            return -1
        return entry.lease if entry.holder == holder else self.place(request_id, holder, entry.base)

    def lengths(self, request_id: str) -> tuple[int, int] | None:
        """(context length the stream stands at, max tokens) of an open request."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        return len(entry.prompt_ids) + entry.delivered, entry.params.max_tokens

    def resume_state(self, request_id: str, tokenizer, holder: int) -> tuple[MovingRequest, int] | None:
        """What replica ``holder`` needs to carry on with the request from the tokens its stream
        already has (a recompute: prompt and outputs prefilled again) and the lease it runs under
        (every earlier one superseded); None if it is not open."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        seq = Sequence(request_id, entry.prompt_ids, entry.params)
        text = TextStream(tokenizer, entry.params.stop)
        if entry.last is not None:
            seq.output_ids = list(entry.last.output_ids)
            seq.logprobs = [(lp.logprob, lp.top) for lp in entry.last.logprobs or []]
            seq.arrival_time = entry.last.metrics.arrival_time
            seq.first_scheduled_time = entry.last.metrics.first_scheduled_time
            seq.first_token_time = entry.last.metrics.first_token_time
            seq.num_preemptions = entry.last.metrics.num_preemptions + 1
            for token in seq.output_ids:  # the detokenizer where the stream stands
                text.push(token)
        return MovingRequest(seq, text, None, None, 0, 0), self.place(request_id, holder)

    def close(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def deliver(self, output: RequestOutput, lease: int = 0) -> None:
        entry = self._entries.get(output.request_id)
        if entry is None:
            return
        if lease != entry.lease and (output.finished or len(output.output_ids) > entry.superseded.get(lease, -1)):
            self.dropped += 1  # a superseded owner past its hand-over (a superseded lease never finishes one)
            return
        start = len(output.output_ids) - len(output.new_token_ids)
        if start < entry.delivered or (start == entry.delivered and start in entry.pending):
            self.dropped += 1
            return
        entry.pending[start] = output
        while entry.delivered in entry.pending:
            item = entry.pending.pop(entry.delivered)
            entry.delivered += len(item.new_token_ids)
            entry.last = item
            entry.stream._put(item)
            if item.finished:
                self._entries.pop(item.request_id, None)
                if self.on_finish is not None:
                    self.on_finish(item)
                return
            if not item.new_token_ids:
                break  # an output without tokens: the next one starts at the same index

    def fail(self, request_id: str, error: Exception, lease: int | None = None) -> None:
        """End the request's stream with ``error`` (only if ``lease`` is current, when given)."""
        entry = self._entries.get(request_id)
        if entry is None or (lease is not None and lease != entry.lease):
            return
        del self._entries[request_id]
        entry.stream._put(error)

    def abort(self, request_id: str) -> None:
        """End the stream of a request no replica runs (its owner was lost) as aborted."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        last = entry.last
        metrics = last.metrics if last is not None else RequestMetrics(time.perf_counter(), None, None, None, 0, 0)
        output = RequestOutput(request_id, entry.prompt_ids, list(last.output_ids) if last else [],
                               last.text if last else "", [], "", True, FinishReason.ABORT.value,
                               last.logprobs if last else None, dataclasses.replace(metrics,
                                                                                   finish_time=time.perf_counter()))
        entry.stream._put(output)
        if self.on_finish is not None:
            self.on_finish(output)


class RayReplica:
    """The serving process's handle of a ReplicaWorker actor (the LocalReplica surface)."""

    remote = True  # its migration steps cross processes: they get deadlines, and a lost reply is possible

    def __init__(self, actor, index: int, info: EngineInfo, facts: dict, streams: StreamTable, *,
                 rejoin_seconds: float = 600.0, silence_seconds: float = 15.0, transport: str = "host"):
        """rejoin_seconds: how long a lost replica's handle waits for Ray to restart its actor (it
        stops at once if the actor is dead for good). silence_seconds: a replica whose output stream
        (a heartbeat every second) is silent this long is lost. transport: how live pages come to
        this replica (jaxinfer.replicas.transport)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"KV transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        self.actor, self.index, self.facts = actor, index, facts
        self._info, self._streams = info, streams
        self.page_size = facts["page_size"]
        self.rejoin_seconds, self.silence_seconds = rejoin_seconds, silence_seconds
        self._metrics: EngineMetrics = facts["metrics"]  # then the latest the actor sent
        self._owned: set[str] = set()  # requests running (or queued) on this replica
        self._reader: asyncio.Task | None = None
        self._rejoin_task: asyncio.Task | None = None
        self._error: str | None = None
        self.rejoins = 0
        # set by the Cluster: called with this replica's index and its requests once it is lost, to
        # resume them elsewhere (without it they fail); and with its index once it is back
        self.on_lost: Callable[[int, list[str]], None] | None = None
        self.on_rejoin: Callable[[int], None] | None = None

    @property
    def on_finish(self):
        return self._streams.on_finish

    @on_finish.setter
    def on_finish(self, callback) -> None:
        self._streams.on_finish = callback

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def metrics(self) -> EngineMetrics:
        return self._metrics

    @property
    def alive(self) -> bool:
        return self._error is None

    def kv_target(self) -> str:
        """How live pages for this replica travel: the source sends them by this transport."""
        return self.transport

    def _start(self) -> None:
        if self._reader is None and self.alive:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            outputs = self.actor.outputs.remote()
            while True:
                try:
                    batch, metrics, alive = await asyncio.wait_for(self._next(outputs), self.silence_seconds)
                except StopAsyncIteration:
                    raise EngineDeadError(f"replica {self.index}'s output stream ended") from None
                except TimeoutError:
                    raise ReplicaSilent(f"no word from replica {self.index} for {self.silence_seconds:g} s") from None
                self._metrics = metrics
                for lease, item in batch:
                    if isinstance(item, _Failed):
                        self._owned.discard(item.request_id)
                        self._streams.fail(item.request_id, EngineDeadError(item.message), lease)
                        continue
                    if item.finished:
                        self._owned.discard(item.request_id)
                    self._streams.deliver(item, lease)
                if not alive:
                    raise EngineDeadError(f"replica {self.index}'s engine stopped")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the actor or its node died: its requests go elsewhere
            self._lose(f"{type(exc).__name__}: {exc}".splitlines()[0], restarting=not isinstance(
                exc, ray.exceptions.ActorDiedError | EngineDeadError))

    @staticmethod
    async def _next(outputs):
        return await (await outputs.__anext__())

    def _lose(self, error: str, restarting: bool) -> None:
        self._error, self._reader = error, None
        logger.error("replica %d is gone: %s", self.index, error)
        lost, self._owned = sorted(self._owned), set()
        if self.on_lost is not None:
            self.on_lost(self.index, lost)
        else:
            for request_id in lost:
                self._streams.fail(request_id, EngineDeadError(f"replica {self.index} is gone ({error})"))
        if restarting and self.rejoin_seconds > 0:
            self._rejoin_task = asyncio.get_running_loop().create_task(self._rejoin())

    async def _rejoin(self) -> None:
        """Wait for Ray to restart the actor (a call blocks while it restarts and fails at once if it
        is dead for good); then clear whatever it still runs (the same process, if it was only
        unreachable: its requests went elsewhere) and take traffic again."""
        deadline = time.monotonic() + self.rejoin_seconds
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.actor.reset.remote(), max(deadline - time.monotonic(), 0.1))
                facts = await self.actor.describe.remote()
            except ray.exceptions.ActorDiedError:
                logger.error("replica %d's actor is dead for good", self.index)
                return
            except (ray.exceptions.RayActorError, TimeoutError):
                await asyncio.sleep(1.0)
                continue
            self.facts, self._metrics, self._error = {**self.facts, **facts}, facts["metrics"], None
            self.rejoins += 1
            logger.info("replica %d is back (pid %s on node %s)", self.index, facts["pid"], facts["node_id"])
            self._start()
            if self.on_rejoin is not None:
                self.on_rejoin(self.index)
            return

    async def add_request(self, ids: Seq[int], params, request_id: str, owner=None) -> RequestStream:
        if not self.alive:
            raise EngineDeadError(f"replica {self.index} is not running ({self._error})")
        self._start()
        params = params.seeded()  # the seed a resumed request needs to continue exactly is known here
        stream = self._streams.open(request_id, owner, ids, params, self.index)
        self._owned.add(request_id)
        try:
            await self.actor.add.remote(list(ids), params, request_id, 0)
        except ray.exceptions.RayTaskError as exc:  # a refused request: ValueError, QueueFullError ...
            self._owned.discard(request_id)
            self._streams.close(request_id)
            raise exc.cause from None
        except ray.exceptions.RayActorError as exc:
            self._owned.discard(request_id)
            self._streams.close(request_id)
            raise EngineDeadError(f"replica {self.index} is not running ({exc})") from None
        return stream

    def abort(self, request_id: str) -> None:
        if self.alive:
            self.actor.abort.remote(request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        for task in (self._reader, self._rejoin_task):
            if task is not None:
                task.cancel()
        try:
            ray.get(self.actor.shutdown.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 - already gone
            pass
        ray.kill(self.actor)

    # -- migration: source ---------------------------------------------------------------------------

    async def stable_pages(self, request_id: str):
        return await self.actor.stable_pages.remote(request_id)

    async def export(self, request_id: str, start: int, stop: int, target):
        present, payload = self.actor.export.remote(request_id, start, stop, target)
        return payload if await present else None  # an object reference: the destination pulls it

    async def detach_request(self, request_id: str, first_page: int, target, preemptions: int,
                             hold_seconds: float | None = None):
        moving = await self.actor.detach_request.remote(request_id, first_page, target, preemptions, hold_seconds)
        if moving is None:
            return None
        self._owned.discard(request_id)
        return moving, None  # the stream stays in the StreamTable

    async def reattach_request(self, request_id: str, stream) -> bool:
        lease = self._streams.take_back(request_id, self.index)
        if lease < 0:  # the stream is closed (aborted meanwhile): nothing to resume
            self.actor.abort.remote(request_id)
            return False
        back = await self.actor.reattach_request.remote(request_id, lease)
        if back:
            self._owned.add(request_id)
        return back

    async def release_request(self, request_id: str) -> None:
        await self.actor.release_request.remote(request_id)

    # -- migration: destination ----------------------------------------------------------------------

    async def reserve(self, request_id: str, num_tokens: int, hold_seconds: float | None = None) -> bool:
        self._start()
        return await self.actor.reserve.remote(request_id, num_tokens, hold_seconds)

    async def receive(self, request_id: str, start: int, count: int, payload) -> None:
        await self.actor.receive.remote(request_id, start, count, payload)

    async def commit_request(self, moving, stream) -> None:
        """Install the request here: from now on only this replica's outputs past the hand-over count."""
        request_id = moving.seq.request_id
        lease = self._streams.place(request_id, self.index, handover=len(moving.seq.output_ids))
        if lease < 0:
            raise RequestClosed(f"request {request_id!r} was closed before it could move")
        await self._install(moving, lease)

    async def _install(self, moving, lease: int) -> None:
        """Commit a request here under ``lease``; it counts as this replica's once sent."""
        request_id = moving.seq.request_id
        self._start()
        self._owned.add(request_id)
        try:
            await self.actor.commit_request.remote(moving, lease)
        except BaseException:
            self._owned.discard(request_id)
            raise

    async def cancel_arrival(self, request_id: str) -> None:
        await self.actor.cancel_arrival.remote(request_id)

    async def holds(self, request_id: str) -> bool:
        held = await self.actor.holds.remote(request_id)
        if held:
            self._owned.add(request_id)
        return held

    async def resume(self, request_id: str) -> bool:
        """Run a request here from the tokens its stream has (its replica was lost, or it was stopped
        for a move that failed); False if its stream is closed."""
        state = self._streams.resume_state(request_id, self._info.tokenizer, self.index)
        if state is None:
            return False
        await self._install(*state)
        return True

    def lengths(self, request_id: str) -> tuple[int, int] | None:
        """(context length, max tokens) of a request from what its stream has; None if it is closed."""
        return self._streams.lengths(request_id)

    def abort_lost(self, request_id: str) -> None:
        """End the stream of a request whose replica was lost before it could be resumed."""
        self._streams.abort(request_id)

    def fail_request(self, request_id: str, error: Exception) -> None:
        self._streams.fail(request_id, error)


class ReplicaSilent(RuntimeError):
    """A replica's output stream (with its heartbeat) stopped: its actor or its link is gone."""


class RequestClosed(RuntimeError):
    """The request's stream was closed (finished or aborted) while a step was on its way."""


def measure_links(replicas: Seq[RayReplica], nbytes: int = 32 << 20) -> dict[tuple[int, int], float]:
    """Bytes per second of every link a live migration can use: for each ordered pair (source,
    destination), the destination pulls ``nbytes`` from the source's object store (replicas on one
    node share its store: their links are memory copies)."""
    links = {}
    for src in replicas:
        ref = src.actor.probe_payload.remote(nbytes)
        ray.wait([ref], fetch_local=False)
        for dst in replicas:
            if dst is not src:
                links[src.index, dst.index] = nbytes / max(ray.get(dst.actor.pull.remote([ref])), 1e-9)
        del ref
    return links


def connect(address: str | None) -> str:
    """Join the Ray cluster at ``address`` (None: $RAY_ADDRESS, else a new instance on this machine),
    unless this process already has; returns its resources in words."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
    total = ray.cluster_resources()
    return ", ".join(f"{total[k]:g} {k}" for k in ("CPU", "GPU", "TPU") if total.get(k)) + \
        f" on {len(ray.nodes())} nodes"


def disconnect() -> None:
    if ray.is_initialized():
        ray.shutdown()


def actor_options(devices: int) -> dict:
    """A replica group's Ray options: ``devices`` accelerators of the cluster's kind (GPU or TPU), else
    one CPU; spread over the nodes."""
    total = ray.cluster_resources()
    if total.get("GPU"):
        return {"num_gpus": devices, "scheduling_strategy": "SPREAD"}
    if total.get("TPU"):
        return {"resources": {"TPU": devices}, "scheduling_strategy": "SPREAD"}
    return {"num_cpus": 1, "scheduling_strategy": "SPREAD"}


def start_replicas(make_engine: Callable[[], Engine | tuple[Engine, dict]], count: int, *, warm_up: bool = True,
                   options: Seq[dict] | None = None, max_restarts: int = -1,
                   rejoin_seconds: float = 600.0, transport: str = "host") -> list[RayReplica]:
    """``count`` ReplicaWorker actors on the connected Ray cluster (``ray.init`` first), each building
    its engine with ``make_engine``; ``options[i]``: the i-th actor's Ray options (resources,
    scheduling strategy, name ...; default: spread over the nodes, one CPU each). An actor whose
    process or node dies is restarted by Ray up to ``max_restarts`` times (-1: always) and its
    replica rejoins (the handle waits up to ``rejoin_seconds`` for it). ``transport``: how live KV
    pages travel to them (jaxinfer.replicas.transport). The replicas share the first one's tokenizer
    (every replica serves the same model)."""
    if count < 1:
        raise ValueError(f"need at least one replica, got {count}")
    worker = ray.remote(ReplicaWorker)
    actors = [worker.options(**{"max_restarts": max_restarts, **(options[i] if options else {
        "num_cpus": 1, "scheduling_strategy": "SPREAD"})}).remote(make_engine, warm_up) for i in range(count)]
    facts = ray.get([actor.describe.remote(tokenizer=index == 0) for index, actor in enumerate(actors)])
    streams = StreamTable()
    replicas = []
    tokenizer = facts[0]["tokenizer"]
    for index, (actor, fact) in enumerate(zip(actors, facts, strict=True)):
        info = EngineInfo(tokenizer, fact["max_model_len"], fact["vocab_size"])
        replicas.append(RayReplica(actor, index, info, fact, streams, rejoin_seconds=rejoin_seconds,
                                   transport=transport))
    return replicas
