"""Bounded load on loopback: 64 concurrent streaming clients send 500 requests of mixed lengths over
HTTP and gRPC, 10% cancelled midway. Every other request completes with the offline engine's output for
the same seed; afterwards no KV page is in use (checked through Stats) and the server is healthy."""

import asyncio
import json
import random

import grpc
import httpx

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc

NUM_REQUESTS = 500
CONCURRENCY = 64
CANCEL_SHARE = 0.1


def make_requests(vocab: int):
    rng = random.Random(2026)
    requests = []
    for i in range(NUM_REQUESTS):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 120))]
        sampled = rng.random() < 0.5
        params = SamplingParams(temperature=0.9 if sampled else 0.0, top_k=rng.choice([0, 20]), seed=i,
                                max_tokens=rng.randint(1, 40), ignore_eos=True)
        cancel = rng.random() < CANCEL_SHARE and params.max_tokens > 4
        requests.append((prompt, params, cancel, "http" if i % 2 else "grpc"))
    return requests


async def over_http(client: httpx.AsyncClient, prompt, params: SamplingParams, cancel: bool):
    body = {"prompt": prompt, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "top_k": params.top_k, "seed": params.seed, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage = "", None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                if cancel and chunk["choices"][0]["finish_reason"] is None:
                    return None  # leaving the stream closes the connection mid-response
            usage = chunk.get("usage") or usage
    return text, usage["completion_tokens"]


async def over_grpc(stub, prompt, params: SamplingParams, cancel: bool):
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), params=pb.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, seed=params.seed, max_tokens=params.max_tokens,
        ignore_eos=True)))
    ids = []
    async for response in call:
        ids.extend(response.token_ids)
        if cancel and response.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
            call.cancel()
            return None
    return ids


def test_load_500_requests_64_clients(served, offline):
    requests = make_requests(offline.model_config.vocab_size)
    expected = offline.generate([r[0] for r in requests], [r[1] for r in requests])

    async def main():
        limit = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=served.http, timeout=120,
                                     limits=httpx.Limits(max_connections=CONCURRENCY)) as client, \
                grpc.aio.insecure_channel(served.grpc) as channel:
            stub = pb_grpc.InferenceStub(channel)

            async def one(request):
                prompt, params, cancel, api = request
                async with limit:
                    if api == "http":
                        return await over_http(client, prompt, params, cancel)
                    return await over_grpc(stub, prompt, params, cancel)
            results = await asyncio.gather(*(one(r) for r in requests))
            for _ in range(200):  # cancelled requests are aborted asynchronously
                stats = await stub.Stats(pb.StatsRequest())
                if not stats.total.kv_pages_used and not stats.requests_in_flight:
                    break
                await asyncio.sleep(0.05)
            return results, stats

    results, stats = asyncio.run(main())
    completed = cancelled = 0
    for (_prompt, params, cancel, api), got, want in zip(requests, results, expected, strict=True):
        if got is None:
            assert cancel
            cancelled += 1
            continue
        completed += 1
        if api == "http":
            assert got == (want.text, params.max_tokens)
        else:
            assert got == want.output_ids
    assert completed + cancelled == NUM_REQUESTS
    intended = sum(r[2] for r in requests)
    assert intended >= 30 and cancelled >= intended // 2  # the rest had finished by their first output
    assert stats.total.kv_pages_used == 0 and stats.total.num_running == 0 and stats.total.num_waiting == 0
    assert stats.requests_in_flight == 0 and stats.engine_alive
    assert httpx.get(served.http + "/health").status_code == 200
