"""While the engine loads and compiles, both ports answer: health NOT_SERVING / HTTP 503 with a JSON body
saying the server is warming up, requests UNAVAILABLE; once ready, the same server serves."""

import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
from jaxinfer.serve.proto import jetstream_pb2 as js
from jaxinfer.serve.proto import jetstream_pb2_grpc as js_grpc
from jaxinfer.serve.server import Server
from tests.serve.harness import ServerThread


@pytest.fixture
def gated(tiny_gguf, monkeypatch):
    """A server whose engine build waits for ``gate``: it listens but is still warming up."""
    gate = threading.Event()
    build = Server._build_engines

    def held_build(self):
        self._say("compiling step shapes: 1/3 (0 s)")
        assert gate.wait(60), "the test never released the warm-up"
        return build(self)

    monkeypatch.setattr(Server, "_build_engines", held_build)
    server = ServerThread(tiny_gguf, wait_ready=False)
    yield server, gate
    gate.set()
    server.starting.result(300)
    server.stop()


def _warming_error(response: httpx.Response) -> str:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "service_unavailable_error" and error["code"] == "unavailable"
    return error["message"]


def test_ports_answer_while_warming_up_then_serve(gated):
    server, gate = gated
    with httpx.Client(base_url=server.http, timeout=30) as http:
        message = _warming_error(http.get("/health"))
        assert "warming up" in message and "compiling step shapes: 1/3" in message
        assert "warming up" in _warming_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}))
        assert "warming up" in _warming_error(http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        assert "warming up" in _warming_error(http.get("/v1/models"))
        assert http.post("/v1/completions", content=b"{not json").status_code == 400  # bad input is still 400
        assert "jaxinfer_engine_ready 0.0" in http.get("/metrics").text

    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        inference = pb_grpc.InferenceStub(channel)
        for call in (lambda: list(inference.Generate(pb.GenerateRequest(text="hi"))),
                     lambda: inference.Tokenize(pb.TokenizeRequest(text="hi")),
                     lambda: inference.Stats(pb.StatsRequest())):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in err.value.details()
        assert not js_grpc.OrchestratorStub(channel).HealthCheck(js.HealthCheckRequest()).is_live

        gate.set()
        server.starting.result(300)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        ids = inference.Tokenize(pb.TokenizeRequest(text="hi")).token_ids
        generated = list(inference.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=ids), params=pb.SamplingParams(max_tokens=3, ignore_eos=True))))
        assert sum(len(r.token_ids) for r in generated) == 3
    with httpx.Client(base_url=server.http, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert "jaxinfer_engine_ready 1.0" in http.get("/metrics").text


def test_drain_during_warm_up_keeps_health_not_serving(gated):
    server, gate = gated
    with grpc.insecure_channel(server.grpc) as channel:
        admin = pb_grpc.AdminStub(channel)
        admin.Drain(pb.DrainRequest(timeout_seconds=1))
        gate.set()
        server.starting.result(300)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        admin.Resume(pb.ResumeRequest())
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
