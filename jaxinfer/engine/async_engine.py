"""Streaming front of an Engine for servers: one loop thread owns the engine (and so the device
state); asyncio callers talk to it through a command queue and get a token stream per request.

- ``await add_request(...)`` validates and queues a request, raising ValueError or QueueFullError
  at once; it returns a ``RequestStream`` (``async for output in stream``).
- ``abort(request_id)`` cancels from any thread; leaving a stream early (break, task cancellation,
  client disconnect) aborts the request too, so its pages are freed at once.
- If a step raises, every in-flight request fails with that error, the engine is marked dead and
  later requests are refused: consistent failure, never a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq

from jaxinfer.engine.client import EngineInfo
from jaxinfer.engine.engine import Engine, EngineMetrics
from jaxinfer.engine.request_output import RequestOutput
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed or was shut down; no request can be served."""


class RequestStream:
    """The outputs of one request, in order; the last one has ``finished`` set."""

    def __init__(self, request_id: str, owner):
        """owner: what ``abort(request_id)`` goes to when the consumer leaves early (the engine, or
        the cluster of replicas the request may move between)."""
        self.request_id = request_id
        self._owner = owner
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished = False

    def _put(self, item: RequestOutput | BaseException) -> bool:
        """Hand an item to the consumer's event loop; False if that loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop was closed
            return False
        return True

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            if not self.finished:  # the consumer left early: free the request's pages now
                self._owner.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine, *, idle_wait_seconds: float = 0.05,
                 on_finish: Callable[[RequestOutput], None] | None = None):
        """on_finish: called on the loop thread with the last output of every request."""
        self.engine = engine
        self._on_finish = on_finish
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._idle_wait = idle_wait_seconds
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._metrics = engine.metrics()
        self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    @property
    def metrics(self) -> EngineMetrics:
        """The snapshot taken after the latest step (safe from any thread)."""
        return self._metrics

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def alive(self) -> bool:
        return self._error is None and self._thread.is_alive()

    async def add_request(self, prompt: str | Seq[int], params: SamplingParams,
                          request_id: str | None = None, owner=None, stream=None) -> RequestStream:
        """stream: where the outputs go (default: a new RequestStream whose early exit aborts via
        ``owner``); anything with ``request_id`` and ``_put(output or error) -> bool``."""
        if not self.alive:
            raise EngineDeadError(f"engine is not running ({self._error or 'stopped'})")
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        stream = stream if stream is not None else RequestStream("", owner or self)
        self._commands.put(("add", (prompt, params, request_id, stream), accepted))
        stream.request_id = await asyncio.wrap_future(accepted)
        return stream

    async def generate(self, prompt: str | Seq[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(prompt, params, request_id)
        async for output in stream:
            yield output

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    async def call(self, function: Callable[[AsyncEngine], object]):
        """Run ``function(self)`` on the loop thread between two steps; returns its result."""
        if not self.alive:
            raise EngineDeadError(f"engine is not running ({self._error or 'stopped'})")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", function, done))
        return await asyncio.wrap_future(done)

    # -- migration (loop thread, through call) -----------------------------------------------------

    def detach(self, request_id: str, first_page: int, destination, hold_seconds: float | None = None):
        """Stop a request for a migration; returns (its MovingRequest, its stream) or None."""
        moving = self.engine.migration.detach(request_id, first_page, destination, hold_seconds)
        if moving is None:
            return None
        self._metrics = self.engine.metrics()
        return moving, self._streams.pop(request_id, None)

    def reattach(self, request_id: str, stream: RequestStream | None) -> bool:
        """Resume a request stopped for a migration (``stream``: where its outputs go again); False if
        it is gone."""
        back = self.engine.migration.reattach(request_id)
        if back and stream is not None:
            self._streams[request_id] = stream
        self._metrics = self.engine.metrics()
        return back

    def commit(self, moving, stream: RequestStream | None) -> None:
        """Install an arriving request; its outputs from now on go to ``stream``."""
        self.engine.migration.commit(moving)
        if stream is not None:
            self._streams[moving.seq.request_id] = stream
        self._metrics = self.engine.metrics()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and stop the loop thread."""
        self._stopping.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout)
        self.engine.close()

    # -- loop thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping.is_set():
                self._drain(block=not engine.has_unfinished)
                if engine.migration.holding and engine.migration.expire():
                    self._metrics = engine.metrics()
                if engine.has_unfinished and not self._stopping.is_set():
                    outputs = engine.step()
                    self._metrics = engine.metrics()
                    for output in outputs:
                        self._deliver(output)
        except BaseException as exc:  # noqa: BLE001 - recorded, delivered to every request, logged
            logger.exception("engine loop failed")
            self._error = exc
        finally:
            self._fail_all(self._error or EngineDeadError("engine shut down"))

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, payload, accepted) -> None:
        if kind == "add":
            prompt, params, request_id, stream = payload
            try:
                request_id = self.engine.add_request(prompt, params, request_id)
            except Exception as exc:  # noqa: BLE001 - a refused request (ValueError, QueueFullError) goes back to the caller
                accepted.set_exception(exc)
                return
            stream.request_id = request_id
            self._streams[request_id] = stream
            self._metrics = self.engine.metrics()
            accepted.set_result(request_id)
        elif kind == "call":
            for output in self.engine.settle():  # the call sees every request as the host has it
                self._deliver(output)
            try:
                accepted.set_result(payload(self))
            except Exception as exc:  # noqa: BLE001 - the caller gets the error; the engine carries on
                accepted.set_exception(exc)
        elif kind == "abort":
            final = self.engine.abort(payload)
            if final is not None:
                self._deliver(final)
                self._metrics = self.engine.metrics()

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if output.finished:
            self._streams.pop(output.request_id, None)
            if self._on_finish is not None:
                self._on_finish(output)
        if stream is not None and not stream._put(output) and not output.finished:
            self._streams.pop(output.request_id, None)
            final = self.engine.abort(output.request_id)
            if final is not None and self._on_finish is not None:
                self._on_finish(final)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - the engine may be inconsistent after a failed step
                logger.exception("abort of %s after engine failure", request_id)
            self._streams.pop(request_id)._put(error if isinstance(error, Exception) else EngineDeadError(str(error)))
        while True:  # requests queued but never added
            try:
                kind, _payload, accepted = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind in ("add", "call"):
                accepted.set_exception(EngineDeadError("engine is not running"))
