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
  before a move and those its destination sends after it can arrive in any order, and a stale copy
  is dropped.
- KV pages move by pull through Ray's object store: the source exports host pages and the
  destination's ``receive`` takes the object reference, so the bytes go actor to actor, never
  through the serving process. The request's host state (token ids, sampling state, its detokenizer)
  travels pickled, without the tokenizer, which the destination binds again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from collections.abc import Sequence as Seq

import jax
import ray

from jaxinfer.engine.async_engine import EngineDeadError, RequestStream
from jaxinfer.engine.client import EngineInfo
from jaxinfer.engine.engine import Engine, EngineMetrics
from jaxinfer.engine.migration_port import MovingRequest
from jaxinfer.engine.request_output import RequestOutput, TextStream
from jaxinfer.engine.sequence import Sequence
from jaxinfer.replicas.replica import LocalReplica
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HOST = "host"  # kv_target of a replica in another process: live pages go through host memory


@dataclasses.dataclass(frozen=True)
class _Failed:
    """A request's stream failed on the replica (its engine stopped)."""

    request_id: str
    message: str


class _Sink:
    """Where a LocalReplica inside the actor puts a request's outputs: the actor's outbox."""

    def __init__(self, request_id: str, outbox: asyncio.Queue):
        self.request_id = request_id
        self._outbox = outbox
        self._loop = asyncio.get_running_loop()

    def _put(self, item) -> bool:
        if isinstance(item, BaseException):
            item = _Failed(self.request_id, f"{type(item).__name__}: {item}")
        try:
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, item)
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

    async def add(self, ids: list[int], params, request_id: str) -> str:
        stream = await self._replica.add_request(ids, params, request_id, stream=_Sink(request_id, self._queue()))
        return stream.request_id

    async def abort(self, request_id: str) -> None:
        self._replica.abort(request_id)

    async def outputs(self, poll_seconds: float = 0.05):
        """Forever: (outputs, load snapshot, alive) whenever there are outputs or the snapshot changed."""
        outbox, last = self._queue(), None
        while True:
            try:
                batch = [await asyncio.wait_for(outbox.get(), poll_seconds)]
            except TimeoutError:
                batch = []
            while not outbox.empty():
                batch.append(outbox.get_nowait())
            metrics = self._replica.metrics
            if batch or metrics is not last:
                last = metrics
                yield batch, metrics, self._replica.alive

    # -- migration: source ---------------------------------------------------------------------------

    async def stable_pages(self, request_id: str):
        return await self._replica.stable_pages(request_id)

    @ray.method(num_returns=2)
    async def export(self, request_id: str, start: int, stop: int):
        """(whether the request was running here, its pages [start, stop) as host arrays)."""
        payload = await self._replica.export(request_id, start, stop, None)
        return payload is not None, jax.device_get(payload)

    async def detach_request(self, request_id: str, first_page: int, live: bool, preemptions: int):
        target = self._replica.kv_target() if live else None
        detached = await self._replica.detach_request(request_id, first_page, target, preemptions)
        if detached is None:
            return None
        moving, sink = detached
        self._detached[request_id] = sink
        return dataclasses.replace(moving, payload=jax.device_get(moving.payload))

    async def reattach_request(self, request_id: str) -> None:
        await self._replica.reattach_request(request_id, self._detached.pop(request_id))

    async def release_request(self, request_id: str) -> None:
        self._detached.pop(request_id, None)
        await self._replica.release_request(request_id)

    # -- migration: destination ----------------------------------------------------------------------

    async def reserve(self, request_id: str, num_tokens: int) -> bool:
        return await self._replica.reserve(request_id, num_tokens)

    async def receive(self, request_id: str, start: int, count: int, payload) -> None:
        await self._replica.receive(request_id, start, count, payload)

    async def commit_request(self, moving) -> None:
        request_id = moving.seq.request_id
        await self._replica.commit_request(moving, _Sink(request_id, self._queue()))

    async def cancel_arrival(self, request_id: str) -> None:
        await self._replica.cancel_arrival(request_id)

    async def holds(self, request_id: str) -> bool:
        return await self._replica.holds(request_id)

    async def pool(self) -> dict:
        """KV pool and migration bookkeeping (for checks: nothing left behind)."""
        def read(a):
            blocks, port = a.engine.block_manager, a.engine.migration
            return {"num_pages": blocks.num_pages, "num_free": blocks.num_free, "unfinished": a.engine.has_unfinished,
                    "detached": sorted(port.detached), "incoming": sorted(port.incoming)}
        return await self._replica.call(read)

    async def shutdown(self) -> None:
        self._replica.shutdown()


@dataclasses.dataclass
class _Entry:
    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams
    delivered: int = 0  # output tokens handed to the stream
    last: RequestOutput | None = None  # the latest output handed to the stream
    pending: dict[int, RequestOutput] = dataclasses.field(default_factory=dict)  # by first token index
    fenced: set[int] = dataclasses.field(default_factory=set)  # replicas declared lost: their outputs are dropped


class StreamTable:
    """The serving process's stream of every request on Ray replicas, fed in token order."""

    def __init__(self):
        self._entries: dict[str, _Entry] = {}
        self.on_finish: Callable[[RequestOutput], None] | None = None
        self.dropped = 0  # stale outputs (already delivered)

    def open(self, request_id: str, owner, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        stream = RequestStream(request_id, owner)
        self._entries[request_id] = _Entry(stream, list(prompt_ids), params)
        return stream

    def fence(self, request_id: str, replica: int) -> None:
        """From now on drop what ``replica`` sends for the request (it was declared lost)."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.fenced.add(replica)

    def resume_state(self, request_id: str, tokenizer) -> MovingRequest | None:
        """What a replica needs to carry on with the request from the tokens its stream already has
        (a recompute: prompt and outputs prefilled again); None if it is not open."""
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
        return MovingRequest(seq, text, None, None, 0, 0)

    def close(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def deliver(self, output: RequestOutput, source: int | None = None) -> None:
        entry = self._entries.get(output.request_id)
        if entry is None:
            return
        if source in entry.fenced:
            self.dropped += 1
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

    def fail(self, request_id: str, error: Exception) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            entry.stream._put(error)


class RayReplica:
    """The serving process's handle of a ReplicaWorker actor (the LocalReplica surface)."""

    def __init__(self, actor, index: int, info: EngineInfo, facts: dict, streams: StreamTable):
        self.actor, self.index, self.facts = actor, index, facts
        self._info, self._streams = info, streams
        self.page_size = facts["page_size"]
        self._metrics: EngineMetrics = facts["metrics"]  # then the latest the actor sent
        self._owned: set[str] = set()  # requests running (or queued) on this replica
        self._reader: asyncio.Task | None = None
        self._error: str | None = None
        # set by the Cluster: called with this replica's index and its requests once it is lost, to
        # resume them elsewhere (without it they fail)
        self.on_lost: Callable[[int, list[str]], None] | None = None

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
        return HOST

    def _start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for ref in self.actor.outputs.remote():
                batch, metrics, alive = await ref
                self._metrics = metrics
                for item in batch:
                    if isinstance(item, _Failed):
                        self._owned.discard(item.request_id)
                        self._streams.fail(item.request_id, EngineDeadError(item.message))
                        continue
                    if item.finished:
                        self._owned.discard(item.request_id)
                    self._streams.deliver(item, self.index)
                if not alive:
                    raise EngineDeadError(f"replica {self.index}'s engine stopped")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the actor or its node died: fail what it held
            self._error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logger.error("replica %d is gone: %s", self.index, self._error)
            lost, self._owned = sorted(self._owned), set()
            for request_id in lost:
                self._streams.fence(request_id, self.index)
            if self.on_lost is not None:
                self.on_lost(self.index, lost)
            else:
                for request_id in lost:
                    self._streams.fail(request_id, EngineDeadError(f"replica {self.index} is gone ({self._error})"))

    async def add_request(self, ids: Seq[int], params, request_id: str, owner=None) -> RequestStream:
        if not self.alive:
            raise EngineDeadError(f"replica {self.index} is not running ({self._error})")
        self._start()
        params = params.seeded()  # the seed a resumed request needs to continue exactly is known here
        stream = self._streams.open(request_id, owner, ids, params)
        self._owned.add(request_id)
        try:
            await self.actor.add.remote(list(ids), params, request_id)
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
        if self._reader is not None:
            self._reader.cancel()
        try:
            ray.get(self.actor.shutdown.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 - already gone
            pass
        ray.kill(self.actor)

    # -- migration: source ---------------------------------------------------------------------------

    async def stable_pages(self, request_id: str):
        return await self.actor.stable_pages.remote(request_id)

    async def export(self, request_id: str, start: int, stop: int, target):
        present, payload = self.actor.export.remote(request_id, start, stop)
        return payload if await present else None  # an object reference: the destination pulls it

    async def detach_request(self, request_id: str, first_page: int, target, preemptions: int):
        moving = await self.actor.detach_request.remote(request_id, first_page, target is not None, preemptions)
        if moving is None:
            return None
        self._owned.discard(request_id)
        return moving, None  # the stream stays in the StreamTable

    async def reattach_request(self, request_id: str, stream) -> None:
        await self.actor.reattach_request.remote(request_id)
        self._owned.add(request_id)

    async def release_request(self, request_id: str) -> None:
        await self.actor.release_request.remote(request_id)

    # -- migration: destination ----------------------------------------------------------------------

    async def reserve(self, request_id: str, num_tokens: int) -> bool:
        self._start()
        return await self.actor.reserve.remote(request_id, num_tokens)

    async def receive(self, request_id: str, start: int, count: int, payload) -> None:
        await self.actor.receive.remote(request_id, start, count, payload)

    async def commit_request(self, moving, stream) -> None:
        self._owned.add(moving.seq.request_id)
        try:
            await self.actor.commit_request.remote(moving)
        except BaseException:
            self._owned.discard(moving.seq.request_id)
            raise

    async def cancel_arrival(self, request_id: str) -> None:
        await self.actor.cancel_arrival.remote(request_id)

    async def holds(self, request_id: str) -> bool:
        held = await self.actor.holds.remote(request_id)
        if held:
            self._owned.add(request_id)
        return held

    def resume_state(self, request_id: str) -> MovingRequest | None:
        return self._streams.resume_state(request_id, self._info.tokenizer)

    def fail_request(self, request_id: str, error: Exception) -> None:
        self._streams.fail(request_id, error)


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
                   options: Seq[dict] | None = None) -> list[RayReplica]:
    """``count`` ReplicaWorker actors on the connected Ray cluster (``ray.init`` first), each building
    its engine with ``make_engine``; ``options[i]``: the i-th actor's Ray options (resources,
    scheduling strategy, name ...; default: spread over the nodes, one CPU each). The replicas share
    the first one's tokenizer (every replica serves the same model)."""
    if count < 1:
        raise ValueError(f"need at least one replica, got {count}")
    worker = ray.remote(ReplicaWorker)
    actors = [worker.options(**(options[i] if options else {"num_cpus": 1, "scheduling_strategy": "SPREAD"}))
              .remote(make_engine, warm_up) for i in range(count)]
    facts = ray.get([actor.describe.remote(tokenizer=index == 0) for index, actor in enumerate(actors)])
    streams = StreamTable()
    replicas = []
    tokenizer = facts[0]["tokenizer"]
    for index, (actor, fact) in enumerate(zip(actors, facts, strict=True)):
        info = EngineInfo(tokenizer, fact["max_model_len"], fact["vocab_size"])
        replicas.append(RayReplica(actor, index, info, fact, streams))
    return replicas
