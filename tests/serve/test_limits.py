"""Back-pressure: a full waiting queue refuses with 429 / RESOURCE_EXHAUSTED instead of queueing
without bound, and the server keeps serving what it accepted."""

import time

import grpc
import httpx
import pytest

from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
from tests.serve.harness import ServerThread, pages_in_use, replace_scheduler


@pytest.fixture(scope="module")
def one_slot(tiny_gguf):
    server = ServerThread(tiny_gguf, replace_scheduler(max_num_seqs=1, max_waiting=1, decode_buckets=(1,)))
    yield server
    server.stop()


def long_request(stub):
    return stub.Generate(pb.GenerateRequest(text="hello", params=pb.SamplingParams(max_tokens=200,
                                                                                   ignore_eos=True)))


def test_full_queue_is_refused_then_recovers(one_slot):
    with grpc.insecure_channel(one_slot.grpc) as channel:
        stub = pb_grpc.InferenceStub(channel)
        running = long_request(stub)
        next(running)  # admitted and generating
        waiting = long_request(stub)
        deadline = time.monotonic() + 30
        while not one_slot.frontend.engine_metrics().num_waiting and time.monotonic() < deadline:
            time.sleep(0.01)  # until the second request sits in the waiting queue
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(text="x", params=pb.SamplingParams(max_tokens=2))))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in err.value.details()
        response = httpx.post(one_slot.http + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
        assert sum(len(r.token_ids) for r in running) == 199
        assert sum(len(r.token_ids) for r in waiting) == 200
    metrics = httpx.get(one_slot.http + "/metrics").text
    assert 'jaxinfer_requests_total{api="grpc",status="busy"} 1.0' in metrics
    assert 'jaxinfer_requests_total{api="completions",status="busy"} 1.0' in metrics
    assert pages_in_use(one_slot) == 0
    assert httpx.post(one_slot.http + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
