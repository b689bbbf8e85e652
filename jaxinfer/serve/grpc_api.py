"""gRPC servicers: jaxinfer.v1 Inference and Admin, JetStream's Orchestrator, standard health
checking and reflection. Each handler translates protos to Frontend calls and errors to status codes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from jaxinfer.engine.engine import EngineMetrics
from jaxinfer.engine.request_output import RequestOutput
from jaxinfer.replicas.cluster import Cluster
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.serve.frontend import ErrorKind, Frontend, RequestError, invalid
from jaxinfer.serve.profiler import ProfileBusyError, TraceCapture
from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
from jaxinfer.serve.proto import jetstream_pb2 as js
from jaxinfer.serve.proto import jetstream_pb2_grpc as js_grpc

logger = logging.getLogger(__name__)

STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
SERVICES = (pb.DESCRIPTOR.services_by_name["Inference"].full_name,
            pb.DESCRIPTOR.services_by_name["Admin"].full_name,
            js.DESCRIPTOR.services_by_name["Orchestrator"].full_name)
OPTIONAL_PARAMS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "max_tokens", "ignore_eos", "logprobs", "sparse_prefill")
JETSTREAM_DEFAULT_MAX_TOKENS = 256


def sampling_params(message: pb.SamplingParams, defaults: Mapping[str, Any]) -> SamplingParams:
    """Proto fields that are set, over ``defaults`` (the model's own), over SamplingParams' defaults
    (raises RequestError on bad values)."""
    values = {**defaults, **{name: getattr(message, name) for name in OPTIONAL_PARAMS if message.HasField(name)}}
    try:
        return SamplingParams(**values, stop=tuple(message.stop), stop_token_ids=tuple(message.stop_token_ids))
    except ValueError as exc:
        raise invalid(str(exc)) from None


def engine_stats(m: EngineMetrics) -> pb.EngineStats:
    return pb.EngineStats(
        num_running=m.num_running, num_waiting=m.num_waiting, kv_pages_used=m.kv_pages_used,
        kv_pages_free=m.kv_pages_free, kv_pages_total=m.kv_pages_total, page_size=m.page_size,
        num_steps=m.num_steps, num_preemptions=m.num_preemptions, prefix_cache_hit_rate=m.prefix_cache_hit_rate,
        prompt_tokens_total=m.prompt_tokens_total, generated_tokens_total=m.generated_tokens_total,
        last_step_seconds=m.last_step_seconds, last_step_tokens=m.last_step_tokens)


def replica_groups(cluster: Cluster) -> list[pb.ReplicaGroupStats]:
    return [pb.ReplicaGroupStats(name=g["name"], num_replicas=len(g["replicas"]), min_context=g["lo"],
                                 max_context=g["hi"], engine=engine_stats(g["metrics"]), replicas=g["replicas"])
            for g in cluster.groups()]


def router_stats(cluster: Cluster) -> pb.RouterStats:
    state = cluster.describe()
    moved, router, failover = state["migrations"], state["router"], state["failover"]
    return pb.RouterStats(
        name=router["router"], migration=state["migration"], migrations_started=moved["started"],
        migrations_completed=moved["completed"], migrations_live=moved["live"],
        migrations_recompute=moved["recompute"], migrations_refused=moved["refused"],
        migrations_gone=moved["gone"], migrations_failed=moved["failed"],
        migrations_in_flight=state["migrations_in_flight"], kv_pages_copied=moved["pages_copied"],
        pause_seconds=moved["pause_seconds"], ms_per_decision=state["router_ms_per_decision"],
        refinements=router.get("refinements", 0), replans=router.get("replans", 0),
        migrations_timed_out=moved["timeouts"], **failover)


def _response(output: RequestOutput) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=output.request_id, token_ids=output.new_token_ids, text=output.new_text)
    if output.logprobs is not None and output.new_token_ids:
        for entry in output.logprobs[-len(output.new_token_ids):]:
            response.logprobs.append(pb.TokenLogprob(
                token_id=entry.token_id, logprob=entry.logprob,
                top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.top.items()]))
    if output.finished:
        response.finish_reason = FINISH.get(output.finish_reason, pb.FINISH_REASON_STOP)
        m = output.metrics
        response.usage.CopyFrom(pb.Usage(
            prompt_tokens=len(output.prompt_ids), completion_tokens=len(output.output_ids),
            cached_prompt_tokens=m.num_cached_tokens, ttft_seconds=m.ttft_seconds or 0.0,
            e2e_seconds=m.e2e_seconds or 0.0))
    return response


async def _abort(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    await context.abort(STATUS[error.kind], error.message)


async def _served(context: grpc.aio.ServicerContext, frontend: Frontend, prompt, params: SamplingParams, api: str,
                  request_id: str | None = None) -> AsyncIterator[RequestOutput]:
    """Admit a request and yield its outputs; refusals and failures end the RPC with their status, and
    an RPC that ends early (deadline, cancellation) aborts the request."""
    try:
        submission = await frontend.submit(prompt, params, api, request_id)
    except RequestError as exc:
        await _abort(context, exc)
        return
    try:
        async with contextlib.aclosing(submission.outputs()) as outputs:
            async for output in outputs:
                yield output
    except RequestError as exc:
        await _abort(context, exc)
    finally:
        submission.close()


def _chat_messages(chat: pb.Chat) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        frontend = self.frontend
        try:
            if _deadline_passed(context):
                raise RequestError(ErrorKind.DEADLINE, "deadline passed before admission")
            params = sampling_params(request.params, frontend.sampling_defaults)
            which = request.WhichOneof("prompt")
            if which == "text":
                prompt = request.text
            elif which == "chat":
                prompt = await frontend.encode_chat(_chat_messages(request.chat))
            elif which == "token_ids":
                prompt = list(request.token_ids.ids)
            else:
                raise invalid("GenerateRequest needs a prompt: text, chat or token_ids")
        except RequestError as exc:
            await _abort(context, frontend.refuse("grpc", exc))
            return
        async with contextlib.aclosing(_served(context, frontend, prompt, params, "grpc",
                                               request.request_id or None)) as outputs:
            async for output in outputs:
                yield _response(output)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            which = request.WhichOneof("input")
            if which == "text":
                ids = await self.frontend.encode(request.text)
            elif which == "chat":
                ids = await self.frontend.encode_chat(_chat_messages(request.chat))
            else:
                raise invalid("TokenizeRequest needs text or chat")
        except RequestError as exc:
            await _abort(context, exc)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            text = self.frontend.decode(request.token_ids, skip_special_tokens=not request.keep_special_tokens)
        except RequestError as exc:
            await _abort(context, exc)
        return pb.DetokenizeResponse(text=text)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        frontend = self.frontend
        if not frontend.ready:
            await _abort(context, frontend.unavailable())
        total = engine_stats(frontend.engine_metrics())
        cluster = frontend.cluster
        if cluster is None:
            groups = [pb.ReplicaGroupStats(name="default", num_replicas=1, min_context=0,
                                           max_context=frontend.max_model_len, engine=total, replicas=[0])]
            return pb.StatsResponse(model=frontend.model_name, draining=frontend.draining,
                                    engine_alive=frontend.engine.alive, requests_in_flight=frontend.num_in_flight,
                                    replica_groups=groups, total=total, uptime_seconds=frontend.uptime_seconds,
                                    replicas=[total])
        return pb.StatsResponse(model=frontend.model_name, draining=frontend.draining,
                                engine_alive=cluster.alive, requests_in_flight=frontend.num_in_flight,
                                replica_groups=replica_groups(cluster), total=total,
                                uptime_seconds=frontend.uptime_seconds, router=router_stats(cluster),
                                replicas=[engine_stats(replica.metrics) for replica in cluster.replicas])


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, frontend: Frontend, profiler: TraceCapture, set_serving: Callable):
        self.frontend = frontend
        self.profiler = profiler
        self.set_serving = set_serving

    async def CaptureProfile(self, request: pb.CaptureProfileRequest, context) -> pb.CaptureProfileResponse:
        try:
            seconds = await self.profiler.capture(request.log_dir, request.duration_ms)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ProfileBusyError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.CaptureProfileResponse(log_dir=request.log_dir, seconds=seconds)

    async def Drain(self, request: pb.DrainRequest, context) -> pb.DrainResponse:
        if request.timeout_seconds < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds must be >= 0")
        await self.set_serving(False)
        timeout = request.timeout_seconds or None
        finished, cancelled, remaining = await self.frontend.drain(timeout, request.cancel_remaining)
        return pb.DrainResponse(finished=finished, cancelled=cancelled, remaining=remaining)

    async def SetStageRanges(self, request: pb.SetStageRangesRequest, context) -> pb.SetStageRangesResponse:
        if not self.frontend.ready:
            await _abort(context, self.frontend.unavailable())
        cluster = self.frontend.cluster
        if cluster is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this server runs one engine; start it with --replicas N --router cascade")
        try:
            cluster.set_stage_ranges(list(request.boundaries), list(request.replicas_per_stage))
        except TypeError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.SetStageRangesResponse(replica_groups=replica_groups(cluster))

    async def Resume(self, request: pb.ResumeRequest, context) -> pb.ResumeResponse:
        frontend = self.frontend
        if frontend.ready and not frontend.engine.alive:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is not running")
        frontend.resume()
        if frontend.ready:  # while warming up, health turns SERVING when the engine is ready
            await self.set_serving(True)
        return pb.ResumeResponse()


class OrchestratorServicer(js_grpc.OrchestratorServicer):
    """JetStream's Decode: text in -> text (and token id) samples out; token ids in -> token ids out."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Decode(self, request: js.DecodeRequest, context) -> AsyncIterator[js.DecodeResponse]:
        frontend = self.frontend
        which = request.WhichOneof("content")
        try:
            if which is None:
                raise invalid("DecodeRequest needs text_content or token_content")
            if request.max_tokens < 0:
                raise invalid(f"max_tokens must be >= 0, got {request.max_tokens}")
            if which == "text_content":
                prompt = request.text_content.text
            else:
                prompt = list(request.token_content.token_ids)
            params = SamplingParams(**frontend.sampling_defaults,
                                    max_tokens=request.max_tokens or JETSTREAM_DEFAULT_MAX_TOKENS)
        except RequestError as exc:
            await _abort(context, frontend.refuse("jetstream", exc))
            return
        async with contextlib.aclosing(_served(context, frontend, prompt, params, "jetstream")) as outputs:
            async for output in outputs:
                if not output.new_token_ids and not output.new_text:
                    continue
                sample = js.DecodeResponse.StreamContent.Sample(token_ids=output.new_token_ids)
                if which == "text_content":
                    sample.text = output.new_text
                yield js.DecodeResponse(stream_content=js.DecodeResponse.StreamContent(samples=[sample]))

    async def HealthCheck(self, request: js.HealthCheckRequest, context) -> js.HealthCheckResponse:
        return js.HealthCheckResponse(is_live=self.frontend.accepting)


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message."""


def _lenient_parser(cls) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError:
            return _Undecodable()
    return parse


def _checked(name: str, handler, streaming: bool):
    """The servicer method, answering INVALID_ARGUMENT to undecodable bytes (grpc's own answer is UNKNOWN)."""
    message = f"request is not a valid {name} message"
    if streaming:
        async def stream_handler(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            async for response in handler(request, context):
                yield response
        return stream_handler

    async def unary_handler(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return await handler(request, context)
    return unary_handler


def _register(server: grpc.aio.Server, module, service: str, servicer) -> None:
    """Add every method of ``module``'s ``service`` (from its descriptor) with lenient request parsing."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_cls = getattr(module, method.input_type.name)
        response_cls = getattr(module, method.output_type.name)
        handler = _checked(method.input_type.name, getattr(servicer, method.name), method.server_streaming)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(handler, request_deserializer=_lenient_parser(request_cls),
                                     response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


class GrpcServer:
    """The aio gRPC server with every service, bound to ``host:port`` (port 0 picks a free one)."""

    def __init__(self, frontend: Frontend, profiler: TraceCapture, host: str, port: int, max_message_bytes: int):
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=options)
        self.health = HealthServicer()
        _register(self.server, pb, "Inference", InferenceServicer(frontend))
        _register(self.server, pb, "Admin", AdminServicer(frontend, profiler, self.set_serving))
        _register(self.server, js, "Orchestrator", OrchestratorServicer(frontend))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {address}")

    async def start(self) -> None:
        """Listen, with health NOT_SERVING until ``set_serving(True)`` (the server is warming up)."""
        await self.set_serving(False)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
