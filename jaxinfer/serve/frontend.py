"""The one path from an API request to the engine, shared by the gRPC and HTTP servicers: admission
(draining, engine health, validation), the request's stream, its metrics, and drain for shutdown.
The servicers only translate their wire format to and from these calls."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from collections.abc import Sequence as Seq
from typing import Any

from jaxinfer.engine.async_engine import EngineDeadError, RequestStream
from jaxinfer.engine.client import EngineClient
from jaxinfer.engine.engine import EngineMetrics
from jaxinfer.engine.request_output import RequestOutput
from jaxinfer.engine.scheduler import QueueFullError
from jaxinfer.replicas.cluster import Cluster
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.serve.metrics import ServingMetrics

logger = logging.getLogger(__name__)


class ErrorKind(enum.StrEnum):
    INVALID = "invalid"  # malformed or out-of-range input
    NOT_FOUND = "not_found"  # unknown model name
    TOO_LARGE = "too_large"  # request body over the limit
    BUSY = "busy"  # the waiting queue is full
    UNAVAILABLE = "unavailable"  # draining, or the engine is down
    DEADLINE = "deadline"  # the client's deadline passed
    INTERNAL = "internal"  # a bug or an engine failure while the request ran


class RequestError(Exception):
    """A refused or failed request; the servicers map ``kind`` to a gRPC status or an HTTP code."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(ErrorKind.INVALID, message)


class Frontend:
    """Built when the server starts listening, before the engine exists: until ``attach`` every request
    is refused as UNAVAILABLE with ``warming`` (what the server is doing: loading, compiling) in the
    message, so clients and health checks get an answer during warm-up instead of a refused connection."""

    def __init__(self, model_name: str, drain_timeout: float = 30.0):
        self.engine: EngineClient | None = None
        self.drain_timeout = drain_timeout
        self.model_name = model_name
        self.tokenizer = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.sampling_defaults: dict[str, Any] = {}  # applied to the fields a request leaves unset
        self.warming = "starting"
        self.draining = False
        self.started = time.monotonic()
        self._in_flight: dict[str, str] = {}  # request id -> api
        self._idle = asyncio.Event()
        self._idle.set()
        self.metrics = ServingMetrics(self.engine_metrics, lambda: self.num_in_flight, lambda: self.cluster)

    def attach(self, engine: EngineClient, sampling_defaults: Mapping[str, Any] | None = None) -> None:
        """Serve ``engine`` (loaded and warmed up) from now on; ``sampling_defaults``: the model's own."""
        self.sampling_defaults = dict(sampling_defaults or {})
        info = engine.info
        self.tokenizer, self.max_model_len, self.vocab_size = info.tokenizer, info.max_model_len, info.vocab_size
        self.engine = engine

    # -- requests -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def alive(self) -> bool:
        """Warmed up and the engine loop running."""
        return self.ready and self.engine.alive

    @property
    def accepting(self) -> bool:
        return not self.draining and self.alive

    def unavailable(self) -> RequestError:
        """Why requests are refused now (warming up, draining or a dead engine)."""
        if not self.ready:
            return RequestError(ErrorKind.UNAVAILABLE, f"server is warming up ({self.warming}); retry shortly")
        if self.draining:
            return RequestError(ErrorKind.UNAVAILABLE, "server is draining; retry elsewhere")
        return RequestError(ErrorKind.UNAVAILABLE, "engine is not running")

    def require_ready(self) -> None:
        """Raise UNAVAILABLE while warming up (the tokenizer and the engine do not exist yet)."""
        if not self.ready:
            raise self.unavailable()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started

    def engine_metrics(self) -> EngineMetrics | None:
        return self.engine.metrics if self.ready else None

    @property
    def cluster(self) -> Cluster | None:
        """The replica groups behind this front end, None with a single engine."""
        return self.engine if isinstance(self.engine, Cluster) else None

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise RequestError(ErrorKind.NOT_FOUND, f"model {name!r} does not exist; this server serves "
                                                    f"{self.model_name!r}")

    def refuse(self, api: str, error: RequestError) -> RequestError:
        """Count a request refused before it reached the engine; returns the error to raise."""
        self.metrics.requests.labels(api, error.kind.value).inc()
        return error

    async def encode_chat(self, messages: Seq[Mapping[str, Any]]) -> list[int]:
        self.require_ready()
        if not messages:
            raise invalid("messages must not be empty")
        try:
            return await asyncio.to_thread(self.tokenizer.encode_chat, messages)
        except (ValueError, TypeError, KeyError) as exc:
            raise invalid(f"messages do not fit the chat template: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - jinja2 template errors on odd input: the client's fault
            raise invalid(f"messages do not fit the chat template: {type(exc).__name__}: {exc}") from None

    async def encode(self, text: str) -> list[int]:
        self.require_ready()
        return await asyncio.to_thread(self.tokenizer.encode, text)

    def decode(self, ids: Seq[int], skip_special_tokens: bool = True) -> str:
        self.require_ready()
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid(f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    async def submit(self, prompt: str | Seq[int], params: SamplingParams, api: str,
                     request_id: str | None = None) -> Submission:
        """Admit one request (raises RequestError when refused); iterate ``outputs()`` for its results."""
        received = time.perf_counter()
        if not self.accepting:
            raise self.refuse(api, self.unavailable())
        if isinstance(prompt, str):  # tokenized here, off the engine thread; the engine validates the ids
            prompt = await self.encode(prompt)
        request_id = request_id or f"{api}-{uuid.uuid4().hex}"  # never collides with a client-chosen id
        if request_id in self._in_flight:
            raise self.refuse(api, invalid(f"request id {request_id!r} is already in use"))
        try:
            stream = await self.engine.add_request(prompt, params, request_id)
        except QueueFullError as exc:
            raise self.refuse(api, RequestError(ErrorKind.BUSY, str(exc))) from None
        except ValueError as exc:
            raise self.refuse(api, invalid(str(exc))) from None
        except EngineDeadError as exc:
            raise self.refuse(api, RequestError(ErrorKind.UNAVAILABLE, str(exc))) from None
        self._in_flight[request_id] = api
        self._idle.clear()
        return Submission(self, stream, api, received)

    def _closed(self, submission: Submission, status: str) -> None:
        self.metrics.requests.labels(submission.api, status).inc()
        del self._in_flight[submission.request_id]
        if not self._in_flight:
            self._idle.set()

    # -- drain ----------------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None, cancel_remaining: bool = True) -> tuple[int, int, int]:
        """Refuse new requests and wait up to ``timeout`` s (default: the server's drain timeout) for
        in-flight ones; then cancel the rest if asked. Returns (finished, cancelled, remaining)."""
        timeout = self.drain_timeout if timeout is None else timeout
        self.draining = True
        before = set(self._in_flight)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass
        left = [rid for rid in before if rid in self._in_flight]
        if cancel_remaining:
            for request_id in left:
                self.engine.abort(request_id)
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except TimeoutError:
                logger.warning("%d requests still open after cancellation", len(self._in_flight))
            return len(before) - len(left), len(left), 0
        return len(before) - len(left), 0, len(left)

    def resume(self) -> None:
        self.draining = False


class Submission:
    """An admitted request: its outputs in order, with metrics recorded on the way. ``close()`` (also
    run when the iteration ends early) aborts it if unfinished and releases it."""

    def __init__(self, frontend: Frontend, stream: RequestStream, api: str, received: float):
        self.frontend = frontend
        self.request_id = stream.request_id
        self.api = api
        self._stream = stream
        self._received = received
        self._status: str | None = None

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        metrics = self.frontend.metrics
        last = None
        status = "cancelled"
        try:
            async for output in self._stream:
                if output.new_token_ids:
                    now = time.perf_counter()
                    if last is None:
                        metrics.ttft.labels(self.api).observe(now - self._received)
                    else:
                        metrics.itl.labels(self.api).observe((now - last) / len(output.new_token_ids))
                    last = now
                if output.finished:
                    status = output.finish_reason or "stop"
                    metrics.e2e.labels(self.api).observe(time.perf_counter() - self._received)
                yield output
        except EngineDeadError as exc:
            status = ErrorKind.INTERNAL.value
            raise RequestError(ErrorKind.INTERNAL, f"engine failed: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the engine loop's failure, delivered to this request
            status = ErrorKind.INTERNAL.value
            logger.exception("request %s failed", self.request_id)
            raise RequestError(ErrorKind.INTERNAL, f"engine failed: {type(exc).__name__}: {exc}") from None
        finally:
            self.close(status)

    def close(self, status: str = "cancelled") -> None:
        if self._status is not None:
            return
        self._status = status
        if not self._stream.finished:
            self.frontend.engine.abort(self.request_id)
        self.frontend._closed(self, status)
