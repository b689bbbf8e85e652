"""``python -m jaxinfer.serve`` as users run it: start-up output, both APIs, graceful SIGTERM/SIGINT
shutdown (in-flight requests finish, exit 0) and one-line errors for bad flags."""

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
from tests.conftest import REPO
from tests.serve.harness import ServeProcess


@pytest.fixture
def process(tiny_gguf, tmp_path):
    proc = ServeProcess(tiny_gguf, tmp_path, "--drain-timeout", "30")
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait()


def test_startup_progress_round_trips_and_sigterm_drains(process):
    text = "".join(process.lines)
    assert "loading" in text and "compiling step shapes" in text
    models = httpx.get(process.http + "/v1/models").json()
    assert models["data"][0]["id"].endswith("tiny.gguf")
    completion = httpx.post(process.http + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}).json()
    assert completion["usage"]["completion_tokens"] == 4
    with grpc.insecure_channel(process.grpc) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert sum(len(r.token_ids) for r in stub.Generate(pb.GenerateRequest(
            text="hello", params=pb.SamplingParams(max_tokens=5, ignore_eos=True)))) == 5
        # a long request in flight when SIGTERM arrives still finishes
        running = stub.Generate(pb.GenerateRequest(text="hello", params=pb.SamplingParams(max_tokens=200,
                                                                                           ignore_eos=True)))
        first = next(running)
        process.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:  # no new requests while draining
            list(stub.Generate(pb.GenerateRequest(text="hi", params=pb.SamplingParams(max_tokens=2))))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(running)
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 200
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert process.proc.wait(60) == 0
    assert "stopped" in "".join(process.lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigint_with_short_drain_cancels_and_exits_zero(tiny_gguf, tmp_path):
    profiler_port = free_port()
    # one decode step per call: in bursts the tiny model writes its 250 tokens before the drain times out
    proc = ServeProcess(tiny_gguf, tmp_path, "--drain-timeout", "0.2", "--profiler-port", str(profiler_port),
                        "--decode-steps", "1")
    try:
        with socket.create_connection(("127.0.0.1", profiler_port), timeout=5):
            pass  # jax.profiler's server listens for live XProf captures
        capture = subprocess.run([sys.executable, "profiling/capture.py", "--target", proc.grpc, "--duration-ms",
                                  "200", "--log-dir", str(tmp_path / "xprof")], cwd=REPO, capture_output=True,
                                 text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert capture.returncode == 0 and "captured" in capture.stdout, capture.stderr
        assert list((tmp_path / "xprof").rglob("*.xplane.pb"))
        with httpx.stream("POST", proc.http + "/v1/completions",
                          json={"prompt": "hello", "max_tokens": 250, "ignore_eos": True, "stream": True}) as response:
            lines = response.iter_lines()
            next(lines)
            proc.proc.send_signal(signal.SIGINT)
            events = list(lines)
        assert '"finish_reason": "abort"' in "".join(events)
        assert proc.proc.wait(60) == 0
        assert "1 cancelled" in "".join(proc.lines)
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()


@pytest.mark.parametrize(("args", "needle"), [
    (["--grpc-port", "70000"], "grpc_port"),
    (["--model", "/nonexistent/model.gguf"], "nonexistent"),
    (["--config", "/nonexistent.toml"], "does not exist"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--sampling-defaults", "mine"], "sampling_defaults"),
])
def test_bad_flags_are_one_line_errors(args, needle):
    result = subprocess.run([sys.executable, "-m", "jaxinfer.serve", "--grpc-port", "0", "--http-port", "0", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # after any progress lines
    assert last.startswith("error:") and needle in last and "Traceback" not in result.stderr


def test_unknown_config_key_and_busy_port(tiny_gguf, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[scheduler]\nmax_num_seq = 3\n")
    result = subprocess.run([sys.executable, "-m", "jaxinfer.serve", "--config", str(bad)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown key 'max_num_seq' in [scheduler]" in result.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "jaxinfer.serve", "--model", tiny_gguf, "--http-port",
                                 str(port)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"cannot serve HTTP on 127.0.0.1:{port}" in result.stderr
