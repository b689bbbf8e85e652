"""RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.cpu import rows


class RMSNorm(nnx.Module):
    """y = x / rms(x) * weight, computed in float32 whatever the parameter dtype."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rows.rms_norm(x, self.weight[...], self.eps)  # every row the same bits whatever the batch (CPU)
