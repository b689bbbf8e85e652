"""Lowering for an accelerator this machine does not have."""

from collections.abc import Callable

import jax

# the GPU the kernels are built for (lent as an H200); jax >= 0.11 needs a GPU's kind to lower Pallas for it
ABSTRACT_GPU = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")


def lowered_text(trace: Callable[[], jax.stages.Traced], platform: str) -> str:
    """StableHLO text of what ``trace()`` traces, lowered for ``platform`` (cuda: for an abstract H200,
    which must be in place while tracing)."""
    if platform != "cuda":
        return trace().lower(lowering_platforms=(platform,)).as_text()
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=ABSTRACT_GPU)):
        return trace().lower(lowering_platforms=(platform,)).as_text()
