"""Replica groups as Ray actors: default serving never imports ray, a missing extra is one line, and
a Ray test cluster of three nodes (each its own raylet and object store, one tiny-model replica per
node) inside a network namespace of its own serves exactly what one engine does and moves running
requests between nodes (live and by recompute) with nothing left behind (tests/replicas/ray_driver.py)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run(code: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_default_serving_never_imports_ray(tiny_gguf):
    code = """
import sys
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.serve.config import ClusterConfig
from tests.serve import harness

for cluster in (ClusterConfig(), ClusterConfig(replicas="2", router="least-loaded")):
    server = harness.ServerThread(sys.argv[1], cluster=cluster)
    async def one():
        stream = await server.frontend.engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        return [t for output in [o async for o in stream] for t in output.new_token_ids]
    assert len(server.call(one())) == 3
    server.stop()
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
assert not loaded, loaded
print("ok")
"""
    result = run(code, tiny_gguf, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                       "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_cluster_ray_without_ray_names_the_extra(tiny_gguf):
    code = """
import sys
sys.modules["ray"] = None  # as if ray were not installed
from jaxinfer.cli import run_main
from jaxinfer.serve.__main__ import main
run_main(main, ["--cluster", "ray", "--model", sys.argv[1], "--http-port", "0", "--grpc-port", "0"])
"""
    result = run(code, tiny_gguf, env={"JAX_PLATFORMS": "cpu"}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --cluster ray needs Ray, which is not installed: pip install 'jaxinfer[cluster]'"]


def test_ray_address_needs_the_ray_runtime():
    from jaxinfer.serve.config import ClusterConfig

    with pytest.raises(ValueError, match="ray_address is for --cluster ray"):
        ClusterConfig(ray_address="10.0.0.1:6379")
    with pytest.raises(ValueError, match="cluster runtime must be one of local, ray"):
        ClusterConfig(runtime="k8s")
    assert ClusterConfig(runtime="ray").enabled


@pytest.fixture(scope="module")
def ray_run():
    pytest.importorskip("ray")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace (unshare -n needs root or user namespaces): Ray must not "
                    "run on this host's interfaces")
    result = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {sys.executable} "
                             "tests/replicas/ray_driver.py"], capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_ray_replicas_on_three_nodes_serve_what_one_engine_does(ray_run):
    assert len(set(ray_run["nodes"])) == 3  # one replica per node, each its own raylet
    assert ray_run["serving"]["tokens"] == ray_run["expected"]["serving"]


@pytest.mark.parametrize("name, reference, mode", [("live", "greedy", "live"),
                                                   ("live_penalties", "penalties", "live"),
                                                   ("recompute", "greedy", "recompute")])
def test_a_request_moved_between_nodes_continues_exactly(ray_run, name, reference, mode):
    run_ = ray_run[name]
    assert run_["moved"] and run_["stats"]["completed"] == 1 and run_["stats"][mode] == 1
    assert all(a["tokens"] == ray_run["expected"][reference] for a in run_["attempts"])  # moved or not
    assert all(a["moved"] or a["stats"]["gone"] == 1 for a in run_["attempts"])  # a miss: it had finished
    if mode == "live":
        assert run_["stats"]["pages_copied"] >= 3  # pre-copied through the object store, then the rest


def test_nothing_is_left_behind_on_any_node(ray_run):
    for pool in ray_run["pools"]:
        assert pool == {"num_pages": pool["num_pages"], "num_free": pool["num_pages"], "unfinished": False,
                        "detached": [], "incoming": []}


@pytest.mark.parametrize("name", ["actor_killed", "node_removed"])
def test_requests_of_a_lost_replica_finish_exactly_on_the_survivors(ray_run, name):
    lost = ray_run[name]
    assert lost["errors"] == []
    expected = ray_run["expected"]
    assert lost["tokens"] == [expected["greedy"], expected["penalties"], expected["second"]]  # no token lost or doubled
    assert lost["failover"] == {"replicas_lost": 1, "requests_resumed": 3, "requests_failed": 0}
    assert ray_run["pools_after_loss"][0]["num_free"] == ray_run["pools_after_loss"][0]["num_pages"]
