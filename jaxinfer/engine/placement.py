"""Replica groups on one host: the local devices split into sub-meshes, and a replica's state
(weights, KV pages, sampler state) placed on its own sub-mesh.

Each sub-mesh has one axis, ``model``. Weights are tensor-parallel over it where the layout splits
cleanly (the MLP's hidden dimension and the vocabulary); attention weights, norms and the KV pages
are replicated on the group's devices. A one-device group simply holds everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "model"

# parameter path suffix -> the axis of the array split over the model axis
_SPLIT_AXIS = {
    ("gate_up_proj", "kernel"): 1,  # [E, 2I]: columns
    ("down_proj", "kernel"): 0,  # [I, E]: rows
    ("lm_head", "kernel"): 1,  # [E, V]
    ("embed_tokens",): 0,  # [V, E]
}


def replica_meshes(num_replicas: int, devices: Sequence[jax.Device] | None = None) -> list[Mesh]:
    """Split the devices into ``num_replicas`` equal groups (in device order), one mesh each."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {num_replicas!r}")
    if len(devices) % num_replicas:
        raise ValueError(f"{len(devices)} devices do not split into {num_replicas} equal replica groups "
                         f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    size = len(devices) // num_replicas
    return [Mesh(np.array(devices[i * size:(i + 1) * size]), (AXIS,)) for i in range(num_replicas)]


def parse_mesh_spec(spec: str, num_devices: int) -> tuple[int, int]:
    """'4' (replicas) or '4x2' (replicas x devices per replica) -> (replicas, devices per replica)."""
    try:
        parts = [int(p) for p in spec.lower().split("x")]
    except ValueError:
        raise ValueError(f"replica spec {spec!r} must look like 4 or 4x2 (replicas x devices each)") from None
    if len(parts) == 1:
        parts.append(num_devices // parts[0] if parts[0] > 0 else 0)
    replicas, per = parts if len(parts) == 2 else (0, 0)
    if replicas < 1 or per < 1 or replicas * per > num_devices:
        raise ValueError(f"replica spec {spec!r} needs {max(replicas, 1) * max(per, 1)} devices; "
                         f"{num_devices} are visible")
    return replicas, per


def _spec(path: tuple, shape: tuple[int, ...], size: int) -> P:
    names = tuple(str(getattr(p, "key", p)) for p in path)
    for suffix, axis in _SPLIT_AXIS.items():
        if names[-len(suffix):] == suffix and len(shape) > axis and shape[axis] % size == 0:
            spec = [None] * len(shape)
            spec[axis] = AXIS
            return P(*spec)
    return P()


def place_state(state, mesh: Mesh):
    """Put a model state pytree (from nnx.split) on the mesh, tensor-parallel where it splits."""
    size = mesh.devices.size

    def place(path, leaf):
        return jax.device_put(leaf, NamedSharding(mesh, _spec(path, np.shape(leaf), size)))
    return jax.tree_util.tree_map_with_path(place, state)


def replicate(tree, mesh: Mesh):
    """Put every array of the pytree on all of the mesh's devices."""
    return jax.device_put(tree, NamedSharding(mesh, P()))
