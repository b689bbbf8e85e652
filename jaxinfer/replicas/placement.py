"""Replica groups on one host: the local devices split into equal sub-meshes, one per replica (each
replica's state is then placed on its mesh by jaxinfer.engine.sharding)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxinfer.engine.sharding import AXIS


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
