"""Dense projection with an [in, out] kernel and an optional bias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). Inputs are cast to the kernel dtype, products accumulate in float32.

    Parameters are created zero-filled: real weights always come from a loader, random ones from
    ``jaxinfer.models.init_random``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: jnp.dtype = jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel,
                       preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y
