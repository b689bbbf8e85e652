"""Fuzzing the request decoders of both APIs (hypothesis, derandomized): random JSON shapes, wrong
types, absurd numbers and raw bytes over HTTP; random bytes and random field values over gRPC. Every
request gets a well-formed answer or a client-error status; none crashes the handler or the engine."""

import json

import grpc
import httpx
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import jetstream_pb2 as js
from tests.serve.harness import pages_in_use

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HTTP_CLIENT_ERRORS = {400, 404, 413}
INT32 = st.integers(-(2**31), 2**31 - 1)

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
small_tokens = st.integers(-3, 40) | json_values
numbers = st.floats(-3, 3) | st.integers(-3, 3) | json_values
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]) | json_values,
                                           "content": st.text(max_size=30) | json_values}), max_size=3) | json_values
common = {"model": st.sampled_from(["tiny", "other"]) | json_values, "max_tokens": small_tokens,
          "temperature": numbers, "top_p": numbers, "top_k": st.integers(-2, 2**40) | json_values,
          "min_p": numbers, "seed": st.integers(-5, 2**64) | json_values, "stop": st.lists(st.text(max_size=4),
                                                                                       max_size=100) | json_values,
          "stream": st.booleans() | json_values, "n": st.integers(0, 2) | json_values, "ignore_eos": st.booleans(),
          "presence_penalty": numbers, "frequency_penalty": numbers, "repetition_penalty": numbers,
          "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
          "stop_token_ids": st.lists(st.integers(-5, 10**6), max_size=3) | json_values}
completion_bodies = st.fixed_dictionaries(
    {}, optional={**common, "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 400), max_size=12) | json_values,
                  "logprobs": st.integers(-1, 30) | json_values, "echo": st.booleans() | json_values})
chat_bodies = st.fixed_dictionaries(
    {}, optional={**common, "messages": messages, "logprobs": st.booleans() | json_values,
                  "top_logprobs": st.integers(-1, 30) | json_values, "max_completion_tokens": small_tokens})


def encode(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def check_http(served, path: str, content: bytes) -> None:
    response = httpx.post(served.http + path, content=content, headers={"content-type": "application/json"},
                          timeout=60)
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        else:
            assert response.json()["choices"]
        return
    assert response.status_code in HTTP_CLIENT_ERRORS, (response.status_code, response.text, content[:200])
    assert isinstance(response.json()["error"]["message"], str)


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.grpc) as ch:
        yield ch


@FUZZ
@given(body=completion_bodies)
def test_fuzz_http_completions(served, body):
    check_http(served, "/v1/completions", encode(body))


@FUZZ
@given(body=chat_bodies)
def test_fuzz_http_chat(served, body):
    check_http(served, "/v1/chat/completions", encode(body))


@FUZZ
@given(raw=st.binary(max_size=300), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzz_http_raw_bytes(served, raw, path):
    check_http(served, path, raw)


def sampling_params():
    floats = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-3, 3)
    return st.builds(
        pb.SamplingParams, temperature=floats, top_p=floats, top_k=INT32, min_p=floats, repetition_penalty=floats,
        presence_penalty=floats, frequency_penalty=floats, seed=st.integers(0, 2**64 - 1),
        max_tokens=st.integers(-5, 30), ignore_eos=st.booleans(), stop=st.lists(st.text(max_size=5), max_size=80),
        stop_token_ids=st.lists(INT32, max_size=3), logprobs=st.integers(-2, 30))


generate_requests = st.one_of(
    st.builds(pb.GenerateRequest, text=st.text(max_size=40), params=sampling_params()),
    st.builds(pb.GenerateRequest, token_ids=st.builds(pb.TokenIds, ids=st.lists(INT32 | st.integers(0, 300),
                                                                                   max_size=20)),
              params=sampling_params()),
    st.builds(pb.GenerateRequest, chat=st.builds(pb.Chat, messages=st.lists(st.builds(
        pb.ChatMessage, role=st.sampled_from(["user", "system", "bogus", ""]), content=st.text(max_size=20)),
        max_size=3)), params=sampling_params()),
    st.builds(pb.GenerateRequest, request_id=st.text(max_size=10)))


def call_raw(channel, method: str, payload: bytes) -> grpc.StatusCode:
    stream = channel.unary_stream(method)  # bytes in, bytes out: no client-side validation
    try:
        for _ in stream(payload, timeout=60):
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@FUZZ
@given(request=generate_requests)
def test_fuzz_grpc_generate_fields(channel, request):
    code = call_raw(channel, "/jaxinfer.v1.Inference/Generate", request.SerializeToString())
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, request)


@FUZZ
@given(raw=st.binary(max_size=200), method=st.sampled_from(["/jaxinfer.v1.Inference/Generate",
                                                            "/jetstream_proto.Orchestrator/Decode"]))
def test_fuzz_grpc_raw_bytes(channel, raw, method):
    message = pb.GenerateRequest if method.startswith("/jaxinfer") else js.DecodeRequest
    try:
        message.FromString(raw)
        parses = True
    except DecodeError:
        parses = False
    code = call_raw(channel, method, raw)
    if parses:
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, raw)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, raw)


def test_server_healthy_after_fuzzing(served):
    """Runs after the fuzz tests above (file order): nothing leaked, nothing broke."""
    assert served.frontend.engine.alive and served.frontend.num_in_flight == 0
    assert pages_in_use(served) == 0
    assert httpx.get(served.http + "/health").status_code == 200
