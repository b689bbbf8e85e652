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


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
              kv_window: int | None = None) -> jax.Array:
    """Causal attention of q [B, T, H, D] at positions[B, T] over caches [B, S, K, D].

    Query at position p sees slots 0..p. Slots above p may hold stale or padding data and are
    never read. ``kv_window`` (static), when every position is below it, limits the read to slots
    [0, kv_window): a prefill chunk early in a long cache then skips the empty tail.
    Returns [B, T, H, D] float32.
    """
    if kv_window is not None and kv_window < k_cache.shape[1]:
        k_cache, v_cache = k_cache[:, :kv_window], v_cache[:, :kv_window]
    batch, num_tokens, num_heads, head_dim = q.shape
    num_slots, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    # Queries of one KV head form one [G*T, D] matrix: two plain batched matmuls per KV head, which
    # XLA on CPU runs about twice as fast as the 5-D einsum with separate G and T axes.
    qg = q.reshape(batch, num_tokens, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(batch, num_kv_heads, group * num_tokens, head_dim)  # [B, K, G*T, D]
    keys = k_cache.transpose(0, 2, 1, 3).astype(q.dtype)  # [B, K, S, D]
    values = v_cache.transpose(0, 2, 1, 3)  # [B, K, S, D]
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, keys, preferred_element_type=jnp.float32) * (head_dim ** -0.5)
    query_pos = jnp.broadcast_to(positions[:, None, None, :], (batch, num_kv_heads, group, num_tokens))
    query_pos = query_pos.reshape(batch, num_kv_heads, group * num_tokens)
    visible = jnp.arange(num_slots)[None, None, None, :] <= query_pos[..., None]  # [B, K, G*T, S]
    probs = jax.nn.softmax(jnp.where(visible, scores, MASK_VALUE), axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    out = out.reshape(batch, num_kv_heads, group, num_tokens, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, num_tokens, num_heads, head_dim)
