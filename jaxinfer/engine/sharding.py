"""A replica's state (weights, KV pages, sampler state) placed on its own mesh (one replica group's
devices; jaxinfer.replicas.placement splits the host's devices into such meshes).

Each mesh has one axis, ``model``. Weights are tensor-parallel over it where the layout splits
cleanly (the MLP's hidden dimension and the vocabulary); attention weights, norms and the KV pages
are replicated on the group's devices. A one-device group simply holds everything.
"""

from __future__ import annotations

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
