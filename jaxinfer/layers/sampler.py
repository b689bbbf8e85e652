"""Token sampling on device with per-row parameters as arrays (no recompilation per value)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
           keys: jax.Array) -> jax.Array:
    """Pick one token per row.

    logits [B, V] float32; temperature [B] (0 = greedy); top_p [B] in (0, 1]; top_k [B] int32
    (0 = no limit); keys [B] typed PRNG keys. Returns [B] int32. The sort needed by top-k/top-p is
    skipped entirely when every row is greedy.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        order = jnp.argsort(-scaled, axis=-1)  # [B, V] descending
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        ranks = jnp.arange(logits.shape[-1])[None, :]
        keep = (top_k[:, None] <= 0) | (ranks < top_k[:, None])
        masked = jnp.where(keep, sorted_logits, -jnp.inf)
        probs = jax.nn.softmax(masked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep &= mass_before < top_p[:, None]  # the top token always survives (mass_before = 0)
        masked = jnp.where(keep, sorted_logits, -jnp.inf)
        choice = jax.vmap(jax.random.categorical)(keys, masked)
        token = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, token, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda _: greedy, None)
