"""Sampling defaults: a request's unset fields take the model's own defaults, then the API's convention
(OpenAI: temperature 1.0; gRPC and JetStream: greedy); fields the request sets always win."""

import dataclasses

import httpx
import pytest

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.serve.grpc_api import sampling_params
from jaxinfer.serve.openai_protocol import ChatCompletionRequest, CompletionRequest
from jaxinfer.serve.proto import inference_pb2 as pb
from tests.serve.harness import ServerThread, tiny_model

MODEL = {"temperature": 0.2, "top_p": 0.9}


def test_openai_requests_take_the_model_defaults_then_the_openai_convention():
    unset = CompletionRequest(prompt="hi").to_params(MODEL)
    assert (unset.temperature, unset.top_p, unset.top_k) == (0.2, 0.9, 0)
    assert CompletionRequest(prompt="hi").to_params({}).temperature == 1.0  # OpenAI's own default
    own = CompletionRequest(prompt="hi", temperature=0.7).to_params(MODEL)
    assert (own.temperature, own.top_p) == (0.7, 0.9)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5).to_params(10, MODEL)
    assert (chat.temperature, chat.top_p, chat.max_tokens) == (0.2, 0.5, 10)


def test_grpc_requests_take_the_model_defaults_then_greedy():
    assert sampling_params(pb.SamplingParams(), {}).temperature == 0.0
    params = sampling_params(pb.SamplingParams(top_p=0.5), MODEL)
    assert (params.temperature, params.top_p) == (0.2, 0.5)
    assert sampling_params(pb.SamplingParams(temperature=0.0), MODEL).temperature == 0.0  # explicitly greedy


def test_server_applies_the_loaded_models_defaults(tiny_gguf, offline):
    greedy_model = dataclasses.replace(tiny_model(tiny_gguf), sampling_defaults={"temperature": 0.0})
    server = ServerThread(tiny_gguf, loaded=greedy_model)
    try:
        assert server.frontend.sampling_defaults == {"temperature": 0.0}
        want = offline.generate(["the cat"], SamplingParams(max_tokens=8, ignore_eos=True))[0].text
        body = {"prompt": "the cat", "max_tokens": 8, "ignore_eos": True}  # no temperature, no seed
        texts = [httpx.post(server.http + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
                 for _ in range(2)]
        assert texts == [want, want]  # greedy by the model's default, not sampled at OpenAI's 1.0
    finally:
        server.stop()


@pytest.mark.parametrize("choice, expected", [("api", {}), ("model", {"top_k": 5})])
def test_sampling_defaults_option(tiny_gguf, choice, expected):
    loaded = dataclasses.replace(tiny_model(tiny_gguf), sampling_defaults={"top_k": 5})
    server = ServerThread(tiny_gguf, loaded=loaded, warm_up=False, sampling_defaults=choice)
    try:
        assert server.frontend.sampling_defaults == expected
    finally:
        server.stop()
