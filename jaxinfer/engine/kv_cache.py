"""Contiguous per-request KV cache: one [B, S, K, D] key and value array per layer.

The cache is a pytree passed into the model and returned updated (never stored on a module); the
jitted steps donate it. Slot s of row b holds the key/value of position s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # num_layers x [B, S, K, D]
    v: tuple[jax.Array, ...]  # num_layers x [B, S, K, D]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))
