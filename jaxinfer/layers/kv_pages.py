"""Paged KV cache: one key and one value array of pages [K, num_layers * P, L, D] for all layers.

Page p of layer l is entry l * P + p: every layer reaches its pages by an index offset into the
same two arrays, which the step updates in place. A page holds L
consecutive token slots of one request (slot s at page s // L, offset s % L); requests own pages
through block tables kept on the host. The arrays are passed into the model and returned updated,
never stored on a module, and the runner donates them to every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig

# KV slot of padding tokens: past the pool for every layer's offset, so their writes are dropped.
PAD_SLOT = 2**30


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPages:
    k: jax.Array  # [K, num_layers * P, L, D]
    v: jax.Array  # [K, num_layers * P, L, D]
    num_pages: int = dataclasses.field(metadata=dict(static=True))  # P, pages per layer

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def shape(config: ModelConfig, num_pages: int, page_size: int, extra_layers: int = 0) -> tuple[int, int, int, int]:
        return (config.num_kv_heads, (config.num_layers + extra_layers) * num_pages, page_size, config.head_dim)

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype, extra_layers: int = 0) -> int:
        """Bytes one page takes over all layers, keys and values."""
        layers = config.num_layers + extra_layers
        return 2 * layers * config.num_kv_heads * page_size * config.head_dim * np.dtype(dtype).itemsize

    @classmethod
    def init(cls, config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32,
             extra_layers: int = 0) -> KVPages:
        """extra_layers: layers past the model's (a draft head's), at page offsets num_layers * P, ..."""
        shape = cls.shape(config, num_pages, page_size, extra_layers)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), num_pages=num_pages)


def _layer_index(kv: KVPages, pages: jax.Array) -> jax.Array:
    """[layers, n] pool entries of the given pages in every layer (padding pages map past the pool)."""
    layers = kv.k.shape[1] // kv.num_pages
    return jnp.arange(layers, dtype=jnp.int32)[:, None] * kv.num_pages + pages[None, :]


def gather_pages(kv: KVPages, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values of ``pages`` in every layer, [K, layers, n, L, D] each (for a migration)."""
    index = _layer_index(kv, pages)
    return kv.k.at[:, index].get(mode="clip"), kv.v.at[:, index].get(mode="clip")


def scatter_pages(kv: KVPages, pages: jax.Array, k: jax.Array, v: jax.Array) -> KVPages:
    """Write gathered pages into ``pages`` (entries >= num_pages are padding and dropped)."""
    index = jnp.where(pages[None, :] < kv.num_pages, _layer_index(kv, pages), kv.k.shape[1])
    return KVPages(kv.k.at[:, index].set(k.astype(kv.k.dtype), mode="drop"),
                   kv.v.at[:, index].set(v.astype(kv.v.dtype), mode="drop"), kv.num_pages)
