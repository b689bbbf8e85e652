"""UniSparse (arXiv 2512.14082) in pure jnp: the references the kernels and the fast CPU path are
tested against. One causal sequence: keys and values [Tk, K, D] at positions 0..Tk-1, queries [Tq, H, D]
at positions q_start..q_start+Tq-1 (a prompt chunk; q_start = 0 and Tq = Tk for a whole prompt), H = K * G
(GQA, query head h reads KV head h // G). Tq, Tk and q_start are multiples of the block size; key
positions at or after ``kv_len`` (bucket padding) are never attended. Query block i is block
q_start / S + i of the sequence; score and mask arrays are [H, Tq / S, Tk / S].

1. ``block_scores``: average-pool queries (factor c_q) and keys (factor c_k) inside blocks into composite
   tokens, softmax their scaled logits per composite query under a composite-level causal mask, and sum
   the probabilities into a [H, Nq, Nk] map of each query block's estimated attention mass per key block
   (rows sum to 1).
2. ``select_blocks``: per (head, query block) keep the sink blocks, the local (diagonal) blocks, then
   key blocks by decreasing estimated mass until the kept mass reaches tau; an optional cap bounds the
   count (forced blocks always stay). Returns the kept-block mask and a compact index list.
3. ``block_sparse_attention_reference``: dense causal attention masked to the kept blocks (f32).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp


class Sparsity(Protocol):
    """The block-sparsity parameters the UniSparse ops read (jaxinfer.config.Sparsity holds them
    for the engine; see its docstring for what each means)."""

    block_size: int
    c_q: int
    c_k: int
    c_h: int
    tau: float
    sink_blocks: int
    local_blocks: int
    max_blocks: int
    share_kv_heads: bool


def _pool(x: jax.Array, factor: int) -> jax.Array:
    """[T, N, D] -> [T / factor, N, D]: the mean of each run of ``factor`` consecutive tokens."""
    t, n, d = x.shape
    return x.astype(jnp.float32).reshape(t // factor, factor, n, d).mean(axis=1)


def check_blocking(q: jax.Array, k: jax.Array, block_size: int) -> None:
    """Shape rules shared by the references, the XLA paths and the kernels."""
    if q.ndim != 3 or k.ndim != 3 or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected q [Tq, H, D] and k [Tk, K, D] with K dividing H, got {q.shape=}, {k.shape=}")
    if q.shape[0] % block_size or k.shape[0] % block_size:
        raise ValueError(f"query length {q.shape[0]} and key length {k.shape[0]} must be multiples of "
                         f"block_size {block_size}")


def composite_visible(num_q: int, num_k: int, config: Sparsity, q_start, kv_len) -> jax.Array:
    """[Tq/cq, Tk/ck] bool: composite query a (positions q_start + a*cq .. + cq - 1) sees composite key b
    (starting at b*ck) when b starts at or before the query run's last token and inside kv_len."""
    a = jnp.arange(num_q)[:, None]
    b = jnp.arange(num_k)[None, :]
    start = b * config.c_k
    return (start <= q_start + (a + 1) * config.c_q - 1) & (start < kv_len)


def block_scores(q: jax.Array, k: jax.Array, config: Sparsity, q_start: jax.Array | int = 0,
                 kv_len: jax.Array | int | None = None) -> jax.Array:
    """[H, Nq, Nk] float32: per query block, the estimated share of its attention mass on each key block."""
    check_blocking(q, k, config.block_size)
    tq, h, d = q.shape
    tk, kv_heads, _ = k.shape
    s = config.block_size
    qc = _pool(q, config.c_q)  # [Tq/cq, H, D]
    kc = jnp.repeat(_pool(k, config.c_k), h // kv_heads, axis=1)  # [Tk/ck, H, D]
    # float32 products (a GPU's default would round them to tf32 and move blocks across tau)
    logits = jnp.einsum("ahd,bhd->hab", qc, kc, precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
    visible = composite_visible(qc.shape[0], kc.shape[0], config, q_start, tk if kv_len is None else kv_len)
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)  # [H, Tq/cq, Tk/ck]
    per_q, per_k = s // config.c_q, s // config.c_k
    return probs.reshape(h, tq // s, per_q, tk // s, per_k).sum(axis=(2, 4)) / per_q


def select_blocks(scores: jax.Array, config: Sparsity, q_start: jax.Array | int = 0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Kept blocks per (head, query block); q_start is the first query's position.

    Returns ``mask`` [H, Nq, Nk] bool, ``indices`` [H, Nq, Nk] int32 (kept key blocks ascending, then
    padding that repeats the last kept block) and ``counts`` [H, Nq] int32.
    """
    _, nq, nk = scores.shape
    i = jnp.arange(nq)[:, None] + q_start // config.block_size
    j = jnp.arange(nk)[None, :]
    causal = j <= i
    forced = causal & ((j < config.sink_blocks) | (j > i - config.local_blocks))
    # forced blocks first, then by decreasing estimated mass; non-causal blocks last
    priority = jnp.where(forced, 2.0, jnp.where(causal, scores, -1.0))
    order = jnp.argsort(-priority, axis=-1, stable=True)
    mass = jnp.take_along_axis(jnp.where(causal, scores, 0.0), order, axis=-1)
    mass_before = jnp.cumsum(mass, axis=-1) - mass
    ranked_forced = jnp.take_along_axis(jnp.broadcast_to(forced, scores.shape), order, axis=-1)
    ranked_causal = jnp.take_along_axis(jnp.broadcast_to(causal, scores.shape), order, axis=-1)
    keep_ranked = ranked_forced | (ranked_causal & (mass_before < config.tau))
    if config.max_blocks:
        rank = jnp.arange(nk)
        keep_ranked = ranked_forced | (keep_ranked & (rank < config.max_blocks))
    mask = jnp.zeros(scores.shape, bool)
    mask = jnp.put_along_axis(mask, order, keep_ranked, axis=-1, inplace=False)
    counts = mask.sum(axis=-1).astype(jnp.int32)
    ascending = jnp.argsort(jnp.where(mask, j, nk + j), axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(ascending, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    indices = jnp.where(jnp.arange(nk) < counts[..., None], ascending, last)
    return mask, indices, counts


def block_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                                     block_size: int, q_start: jax.Array | int = 0) -> jax.Array:
    """Dense causal attention restricted to the kept (query block, key block) pairs; [Tq, H, D] in q's
    dtype. With an all-true mask this is plain causal attention (the dense reference)."""
    check_blocking(q, k, block_size)
    tq, h, d = q.shape
    group = h // k.shape[1]
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=1)
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=1)
    logits = jnp.einsum("thd,shd->hts", q.astype(jnp.float32), kf) / jnp.sqrt(jnp.float32(d))
    query_pos = q_start + jnp.arange(tq)
    allowed = (jnp.arange(k.shape[0])[None, :] <= query_pos[:, None])[None] & jnp.repeat(
        jnp.repeat(mask, block_size, axis=1), block_size, axis=2)
    probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    return jnp.einsum("hts,shd->thd", probs, vf).astype(q.dtype)
