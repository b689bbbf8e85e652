"""RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """y = x / rms(x) * weight, computed in float32 whatever the parameter dtype."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        return x32 * jax.lax.rsqrt(variance + self.eps) * self.weight[...].astype(jnp.float32)
