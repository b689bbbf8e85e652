"""A Ray test cluster on this machine for the drivers in this folder (run inside a network namespace
of their own: Ray listens on every interface): a head without CPUs, which the calling process joins
as the driver, and worker nodes of one CPU each, each its own raylet and object store."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def local_ray(nodes: int, object_store: int = 80 << 20):
    """Yield (the ray.cluster_utils Cluster, its worker node handles, a scratch folder): node i carries
    the resource ``host{i}`` (to pin a replica to it); token auth with a token made for this cluster.
    Ray is shut down, the cluster stopped and the folder removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="ji-ray-"))
    token = work / "token"
    token.write_text(secrets.token_hex(32))
    # before ray is imported; RAY_TMPDIR: Ray's files, the current cluster's address file included (by
    # default /tmp/ray/ray_current_cluster, which Ray does not create), stay in this cluster's folder
    (work / "ray").mkdir()
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(work))
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": object_store, "temp_dir": str(work / "ray")})
    try:
        handles = [cluster.add_node(num_cpus=1, resources={f"host{i}": 1}, object_store_memory=object_store)
                   for i in range(nodes)]
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}})
        yield cluster, handles, work
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
