"""An engine step that raises fails the requests in flight with INTERNAL / 500, turns health to
NOT_SERVING / 503 and refuses later requests as UNAVAILABLE; the server process itself keeps answering
and stops cleanly."""

import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
from tests.serve.harness import ServerThread


def test_engine_failure_is_reported_not_hung(tiny_gguf):
    server = ServerThread(tiny_gguf)
    try:
        def broken_step():
            raise RuntimeError("injected device failure")
        server.engine.step = broken_step
        response = httpx.post(server.http + "/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=30)
        assert response.status_code == 500 and "injected device failure" in response.json()["error"]["message"]
        with grpc.insecure_channel(server.grpc) as channel:
            stub = pb_grpc.InferenceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(pb.GenerateRequest(text="hello"), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not stub.Stats(pb.StatsRequest()).engine_alive
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and health.Check(health_pb2.HealthCheckRequest()).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.1)  # the server's watcher notices within a second
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert httpx.get(server.http + "/health").status_code == 503
        response = httpx.post(server.http + "/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "x"}]}, timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
        metrics = httpx.get(server.http + "/metrics").text
        assert 'jaxinfer_requests_total{api="completions",status="internal"} 1.0' in metrics
    finally:
        server.stop()
