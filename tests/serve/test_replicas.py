"""Serving from replica groups: a cluster of engines behind the cascade router, on the 8 virtual CPU
devices. Requests from a scaled slice of the Azure conversation trace all complete with the outputs
of a single engine while the router hands requests over between stages; Stats, /metrics and the
Admin stage ranges."""

import asyncio
import dataclasses
import json

import grpc
import httpx
import pytest

from jaxinfer.datasets import TRACES, shared_file
from jaxinfer.router.cost_model import CostModel
from jaxinfer.router.trace import load_azure
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.serve.config import ClusterConfig
from jaxinfer.serve.proto import inference_pb2 as pb
from jaxinfer.serve.proto import inference_pb2_grpc as pb_grpc
from tests.serve import harness

TRACE = shared_file("traces", TRACES["azure_conv"])


@pytest.fixture(scope="module")
def cost_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster") / "cost_model.json"
    model = CostModel.synthetic(max_len=256, kv_capacity_tokens=2048, page_size=4, max_num_seqs=8,
                                max_num_batched_tokens=32)
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def cluster_server(tiny_gguf, cost_model_path):
    # one decode step per call: with bursts the tiny model finishes a request within one or two of the
    # router's 20 ms looks, and this test needs requests handed over while they decode
    engine = dataclasses.replace(harness.ENGINE, scheduler=dataclasses.replace(harness.SCHEDULER, decode_steps=1))
    server = harness.ServerThread(tiny_gguf, engine, cluster=ClusterConfig(replicas="4", router="cascade",
                                                                            cost_model=cost_model_path))
    yield server
    server.stop()


def trace_slice(count=24, vocab=40):
    """The first requests of the Azure trace, lengths scaled 1/40 (to fit the tiny model's 256-token
    context) and arrivals compressed 20x; prompts are deterministic token ids."""
    if TRACE is None:
        pytest.skip("Azure trace not found in the shared data folder")
    requests = []
    for index, r in enumerate(load_azure(TRACE, limit=count)):
        prompt_len = min(max(r.prompt_len // 40, 2), 120)
        output_len = min(max(r.output_len // 4, 4), 100)
        prompt = [3 + (index * 7 + 3 * i) % vocab for i in range(prompt_len)]
        requests.append((r.arrival / 20, prompt, output_len))
    return requests


def test_trace_slice_on_four_replicas_matches_one_engine(cluster_server, offline):
    cluster = cluster_server.frontend.cluster
    # narrow stages so that requests outgrow theirs and are handed over while they decode
    cluster.set_stage_ranges([0, 48, 96, 160, 256], [1, 1, 1, 1])
    cluster.router.interval = 0.02  # the tiny model decodes fast: look often enough to catch requests mid-stage
    requests = trace_slice()
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for _, _, n in requests]
    want = offline.generate([p for _, p, _ in requests], params)

    async def one(arrival, prompt, p):
        await asyncio.sleep(arrival)
        submission = await cluster_server.frontend.submit(prompt, p, "test")
        tokens = []
        async for output in submission.outputs():
            tokens += output.new_token_ids
        return tokens

    async def run():
        return await asyncio.gather(*(one(a, p, sp) for (a, p, _), sp in zip(requests, params, strict=True)))
    got = cluster_server.call(run(), timeout=300)
    assert got == [w.output_ids for w in want]  # every request completed, token for token
    stats = cluster.describe()
    assert stats["migrations"]["completed"] >= 2, stats
    assert stats["migrations"]["failed"] == 0
    for replica in cluster.replicas:
        assert replica.engine.block_manager.num_used == 0 or not replica.engine.has_unfinished


def test_stats_and_admin_stage_ranges(cluster_server):
    with grpc.insecure_channel(cluster_server.grpc) as channel:
        stats = pb_grpc.InferenceStub(channel).Stats(pb.StatsRequest())
        assert len(stats.replicas) == 4 and stats.router.name == "cascade"
        router = stats.router
        assert (router.replicas_lost, router.requests_failed, router.migrations_timed_out) == (0, 0, 0)
        groups = stats.replica_groups
        assert groups[0].min_context == 0 and groups[-1].max_context == 256
        assert sorted(i for g in groups for i in g.replicas) == [0, 1, 2, 3]
        admin = pb_grpc.AdminStub(channel)
        reply = admin.SetStageRanges(pb.SetStageRangesRequest(boundaries=[0, 64, 256], replicas_per_stage=[3, 1]))
        assert [(g.min_context, g.max_context, list(g.replicas)) for g in reply.replica_groups] == [
            (0, 64, [0, 1, 2]), (64, 256, [3])]
        reply = admin.SetStageRanges(pb.SetStageRangesRequest(boundaries=[0, 100, 256]))
        assert [g.max_context for g in reply.replica_groups] == [100, 256]
        for bad in (pb.SetStageRangesRequest(boundaries=[0, 300, 256]),
                    pb.SetStageRangesRequest(boundaries=[0, 64, 128, 256]),
                    pb.SetStageRangesRequest(boundaries=[0, 64, 256], replicas_per_stage=[3, 3])):
            with pytest.raises(grpc.RpcError) as error:
                admin.SetStageRanges(bad)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details()
    metrics = httpx.get(cluster_server.http + "/metrics").text
    assert 'jaxinfer_stage_context_bound_tokens{bound="hi",stage="stage0"} 100.0' in metrics
    assert 'jaxinfer_replica_requests_running{replica="3"}' in metrics
    assert "jaxinfer_migrations_total" in metrics
    assert 'jaxinfer_failover_total{event="replicas_lost"} 0.0' in metrics


def test_single_engine_has_no_stages(served):
    with grpc.insecure_channel(served.grpc) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.AdminStub(channel).SetStageRanges(pb.SetStageRangesRequest(boundaries=[0, 256]))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cluster_config_errors():
    for kwargs, needle in ((dict(replicas="0"), "replicas"), (dict(replicas="4y"), "replicas"),
                           (dict(router="random"), "router"), (dict(migration="teleport"), "migration")):
        with pytest.raises(ValueError, match=needle):
            ClusterConfig(**kwargs)


def test_http_completion_on_replicas(cluster_server, offline):
    want = offline.generate(["the cat"], SamplingParams(max_tokens=6, ignore_eos=True))[0].text
    reply = httpx.post(cluster_server.http + "/v1/completions", json=dict(
        model="tiny", prompt="the cat", max_tokens=6, ignore_eos=True, temperature=0), timeout=60)
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.text)["choices"][0]["text"] == want
