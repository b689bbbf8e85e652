"""The sparse prefill settings and the per-request opt-out, from the serve CLI/TOML, HTTP and gRPC."""

import pydantic
import pytest

from jaxinfer.serve.config import parse_args
from jaxinfer.serve.grpc_api import sampling_params
from jaxinfer.serve.openai_protocol import CompletionRequest
from jaxinfer.serve.proto import inference_pb2 as pb


def test_cli_and_toml_set_the_sparse_prefill_config(tmp_path):
    _, engine = parse_args([])
    assert engine.sparse_prefill.mode == "sparse" and engine.sparse_prefill.min_len == 4096
    _, engine = parse_args(["--sparse-prefill", "dense_blocked", "--sparse-min-len", "2048", "--sparse-tau", "0.8"])
    assert (engine.sparse_prefill.mode, engine.sparse_prefill.min_len, engine.sparse_prefill.unisparse.tau) == (
        "dense_blocked", 2048, 0.8)
    config = tmp_path / "serve.toml"
    config.write_text('[engine]\nsparse_prefill = "off"\nsparse_min_len = 100\n')
    _, engine = parse_args(["--config", str(config)])
    assert engine.sparse_prefill.mode == "off" and engine.sparse_prefill.min_len == 100
    with pytest.raises(ValueError, match="tau"):
        parse_args(["--sparse-tau", "1.5"])
    with pytest.raises(SystemExit):
        parse_args(["--sparse-prefill", "fast"])


def test_http_and_grpc_requests_carry_the_opt_out():
    request = CompletionRequest(model="m", prompt="hi", sparse_prefill=False)
    assert request.sampling_params(4, None, {}).sparse_prefill is False
    assert CompletionRequest(model="m", prompt="hi").sampling_params(4, None, {}).sparse_prefill is True
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(model="m", prompt="hi", sparse_prefill="sometimes")
    assert sampling_params(pb.SamplingParams(sparse_prefill=False), {}).sparse_prefill is False
    assert sampling_params(pb.SamplingParams(), {}).sparse_prefill is True
