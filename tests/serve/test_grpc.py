"""jaxinfer.v1 gRPC services, standard health checking and reflection."""

import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
from tests.serve.harness import pages_in_use

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.grpc) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.InferenceStub(channel)


def wait_idle(served, timeout=10):
    deadline = time.monotonic() + timeout
    while (pages_in_use(served) or served.frontend.num_in_flight) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pages_in_use(served) == 0 and served.frontend.num_in_flight == 0


def test_generate_text_streams_in_order_with_usage(stub, offline):
    want = offline.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    responses = list(stub.Generate(pb.GenerateRequest(
        text=PROMPT, params=pb.SamplingParams(max_tokens=10, ignore_eos=True), request_id="g1")))
    assert [t for r in responses for t in r.token_ids] == want.output_ids
    assert "".join(r.text for r in responses) == want.text
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and all(r.request_id == "g1" for r in responses)
    assert last.usage.prompt_tokens == len(want.prompt_ids) and last.usage.completion_tokens == 10
    assert last.usage.e2e_seconds >= last.usage.ttft_seconds > 0
    assert not any(r.HasField("usage") for r in responses[:-1])


def test_generate_chat_token_ids_and_sampling_fields(stub, offline):
    messages = [{"role": "user", "content": "hello"}]
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                            presence_penalty=0.5, frequency_penalty=0.3, seed=77, max_tokens=8, ignore_eos=True,
                            logprobs=2)
    ids = offline.tokenizer.encode_chat(messages)
    want = offline.generate([ids], params)[0]
    proto = pb.SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                              presence_penalty=0.5, frequency_penalty=0.3, seed=77, max_tokens=8, ignore_eos=True,
                              logprobs=2)
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hello")])
    for request in (pb.GenerateRequest(chat=chat, params=proto),
                    pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), params=proto)):
        responses = list(stub.Generate(request))
        assert [t for r in responses for t in r.token_ids] == want.output_ids
        logprobs = [lp for r in responses for lp in r.logprobs]
        assert [lp.token_id for lp in logprobs] == want.output_ids
        assert all(len(lp.top) == 2 for lp in logprobs)
        assert [lp.logprob for lp in logprobs] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-5)


def test_stop_strings_and_stop_tokens(stub, offline):
    free = offline.generate([PROMPT], SamplingParams(max_tokens=20, ignore_eos=True))[0].output_ids
    stop_id = free[3]
    responses = list(stub.Generate(pb.GenerateRequest(
        text=PROMPT, params=pb.SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id]))))
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    assert [t for r in responses for t in r.token_ids] == free[:free.index(stop_id) + 1]


def test_tokenize_detokenize_round_trip(stub, offline):
    ids = stub.Tokenize(pb.TokenizeRequest(text=PROMPT)).token_ids
    assert list(ids) == offline.tokenizer.encode(PROMPT)
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == PROMPT
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="x")])
    assert list(stub.Tokenize(pb.TokenizeRequest(chat=chat)).token_ids) == offline.tokenizer.encode_chat(
        [{"role": "user", "content": "x"}])
    with pytest.raises(grpc.RpcError) as err:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[10**6]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stats_report_engine_and_replica_group(stub, served):
    stats = stub.Stats(pb.StatsRequest())
    assert stats.model == "tiny" and stats.engine_alive and not stats.draining
    assert len(stats.replica_groups) == 1 and stats.replica_groups[0].max_context == 256
    assert stats.total.kv_pages_total == 512 and stats.total.page_size == 4
    assert stats.total.generated_tokens_total > 0


@pytest.mark.parametrize(("request_", "code", "needle"), [
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "needs a prompt"),
    (pb.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(top_p=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT,
     "top_p"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(seed=2**64 - 1)), grpc.StatusCode.INVALID_ARGUMENT, "seed"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(stop=["s"] * 1000)), grpc.StatusCode.INVALID_ARGUMENT,
     "stop"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(logprobs=99)), grpc.StatusCode.INVALID_ARGUMENT,
     "logprobs"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, -5])), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    (pb.GenerateRequest(text="word " * 400), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    (pb.GenerateRequest(chat=pb.Chat()), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (pb.GenerateRequest(text="a" * (5 * 2**20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
def test_bad_generate_requests(stub, served, request_, code, needle):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_))
    assert err.value.code() == code
    assert needle in err.value.details()
    assert stub.Stats(pb.StatsRequest()).engine_alive


def test_deadline_aborts_and_frees_pages(stub, served):
    call = stub.Generate(pb.GenerateRequest(text=PROMPT, params=pb.SamplingParams(max_tokens=250, ignore_eos=True)),
                         timeout=0.3)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            time.sleep(0.01)  # a slow reader: the deadline passes mid-stream
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(served)


def test_client_cancel_frees_pages(stub, served):
    call = stub.Generate(pb.GenerateRequest(text=PROMPT, params=pb.SamplingParams(max_tokens=250, ignore_eos=True)))
    next(call)
    assert pages_in_use(served) > 0
    call.cancel()
    assert wait_idle(served)


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jaxinfer.v1.Inference", "jetstream_proto.Orchestrator"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"jaxinfer.v1.Inference", "jaxinfer.v1.Admin", "jetstream_proto.Orchestrator",
            "grpc.health.v1.Health"} <= names
    files = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="jaxinfer.v1.Inference")])))
    assert files[0].file_descriptor_response.file_descriptor_proto


def test_admin_profile_capture(channel, stub, tmp_path):
    admin = pb_grpc.AdminStub(channel)
    responses = stub.Generate(pb.GenerateRequest(text=PROMPT, params=pb.SamplingParams(max_tokens=60,
                                                                                       ignore_eos=True)))
    result = admin.CaptureProfile(pb.CaptureProfileRequest(duration_ms=300, log_dir=str(tmp_path)))
    list(responses)
    assert result.seconds >= 0.3
    traces = list(Path(tmp_path).rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    for bad in (pb.CaptureProfileRequest(duration_ms=0, log_dir=str(tmp_path)),
                pb.CaptureProfileRequest(duration_ms=100)):
        with pytest.raises(grpc.RpcError) as err:
            admin.CaptureProfile(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_admin_drain_and_resume(channel, stub, served):
    admin = pb_grpc.AdminStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    running = stub.Generate(pb.GenerateRequest(text=PROMPT, params=pb.SamplingParams(max_tokens=40,
                                                                                     ignore_eos=True)))
    first = next(running)
    drained = admin.Drain(pb.DrainRequest(timeout_seconds=30))
    rest = list(running)  # the in-flight request finishes during the drain
    tokens = sum(len(response.token_ids) for response in (first, *rest))  # a burst streams several at once
    assert tokens == 40 and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and first.token_ids
    assert drained.finished == 1 and drained.cancelled == 0
    try:
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(text=PROMPT)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        response = httpx.post(served.http + "/v1/completions", json={"prompt": PROMPT})
        assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
        assert httpx.get(served.http + "/health").status_code == 503
    finally:
        admin.Resume(pb.ResumeRequest())
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert len(list(stub.Generate(pb.GenerateRequest(text=PROMPT, params=pb.SamplingParams(max_tokens=2))))) >= 1


def test_drain_with_timeout_cancels_the_rest(channel, stub, served):
    admin = pb_grpc.AdminStub(channel)
    running = stub.Generate(pb.GenerateRequest(text=PROMPT, params=pb.SamplingParams(max_tokens=250,
                                                                                     ignore_eos=True)))
    next(running)
    try:
        drained = admin.Drain(pb.DrainRequest(timeout_seconds=0.05, cancel_remaining=True))
        assert drained.cancelled == 1
        responses = list(running)
        assert responses[-1].finish_reason == pb.FINISH_REASON_ABORT
        assert wait_idle(served)
    finally:
        admin.Resume(pb.ResumeRequest())
