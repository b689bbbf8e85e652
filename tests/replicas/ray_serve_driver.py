"""``serve --cluster ray`` end to end: a Ray test cluster (head without CPUs, three worker nodes) inside
a network namespace of its own, the server (tests/serve/harness.ServerThread over the tiny GGUF)
joining it with one replica actor per node and the cascade router in narrow stages, so that
requests outgrow their stage and are handed off to a replica on another node while they decode.
A scaled slice of the Azure conversation trace goes in over gRPC (half) and OpenAI HTTP (half),
greedy; prints one JSON line with what came back, what one engine gives for the same prompts, the
router's hand-offs and where the replicas ran.

    unshare -n sh -c 'ip link set lo up && python tests/replicas/ray_serve_driver.py'
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
NODES = 3


def main() -> None:
    import grpc
    import httpx

    from jaxinfer.router.cost_model import CostModel
    from jaxinfer.sampling_params import SamplingParams
    from jaxinfer.serve.config import ClusterConfig
    from jaxinfer.serve.proto import inference_pb2 as pb
    from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
    from tests.replicas.local_ray import local_ray
    from tests.serve import harness
    from tests.serve.test_replicas import trace_slice

    with local_ray(NODES) as (cluster, _, work):
        model = str(harness.write_tiny_gguf(work / "tiny.gguf"))
        cost_model = work / "cost_model.json"
        CostModel.synthetic(max_len=256, kv_capacity_tokens=2048, page_size=4, max_num_seqs=8,
                            max_num_batched_tokens=32).save(cost_model)
        # one decode step per call, so requests are still decoding when the router looks
        engine = dataclasses.replace(harness.ENGINE, scheduler=dataclasses.replace(harness.SCHEDULER,
                                                                                   decode_steps=1))
        started = time.perf_counter()
        server = harness.ServerThread(model, engine, cluster=ClusterConfig(
            replicas=str(NODES), router="cascade", runtime="ray", ray_address=cluster.address,
            cost_model=str(cost_model)))
        try:
            up = time.perf_counter() - started
            served = server.frontend.cluster
            served.router.interval = 0.02
            with grpc.insecure_channel(server.grpc) as channel:  # narrow stages: requests outgrow theirs
                pb_grpc.AdminStub(channel).SetStageRanges(pb.SetStageRangesRequest(boundaries=[0, 48, 112, 256],
                                                                                   replicas_per_stage=[1, 1, 1]))
            requests = trace_slice(count=18)
            offline = harness.offline_engine(model)
            params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for _, _, n in requests]
            outputs = offline.generate([p for _, p, _ in requests], params)
            expected = [o.output_ids if i % 2 == 0 else o.text for i, o in enumerate(outputs)]  # gRPC ids, HTTP text

            def over_grpc(prompt, max_tokens):
                with grpc.insecure_channel(server.grpc) as channel:
                    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), params=pb.SamplingParams(
                        max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
                    return [t for response in pb_grpc.InferenceStub(channel).Generate(request)
                            for t in response.token_ids]

            def over_http(prompt, max_tokens):  # OpenAI completions give text: compared with the detokenized ids
                body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                        "ignore_eos": True}
                return httpx.post(server.http + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

            async def run():
                async def one(index, arrival, prompt, max_tokens):
                    await asyncio.sleep(arrival)
                    call = over_grpc if index % 2 == 0 else over_http
                    return await asyncio.to_thread(call, prompt, max_tokens)
                return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))
            got = asyncio.run(run())
            state = served.describe()
            result = {"tokens": got, "expected": expected, "startup_seconds": up,
                      "handoffs": state["router"]["handoffs"], "migrations": state["migrations"],
                      "nodes": [r.facts["node_id"] for r in served.replicas],
                      "links": len(state["links_bytes_per_second"])}
        finally:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
