"""Causal grouped-query attention over a contiguous KV cache (pure jnp; the spec for kernels).

Axis letters: B batch, T query tokens, S KV slots, H query heads, K KV heads, G = H / K, D head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30


def write_kv(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Store new [B, T, K, D] at slots positions[B, T] of cache [B, S, K, D].

    Slots past the end of the cache are dropped: padding tokens may carry such positions.
    """
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array) -> jax.Array:
    """Causal attention of q [B, T, H, D] at positions[B, T] over caches [B, S, K, D].

    Query at position p sees slots 0..p. Slots above p may hold stale or padding data and are
    never read. Returns [B, T, H, D] float32.
    """
    batch, num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, num_tokens, num_kv_heads, group, head_dim)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (head_dim ** -0.5)
    slots = jnp.arange(k_cache.shape[1])
    visible = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, num_tokens, num_heads, head_dim)
