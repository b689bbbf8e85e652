"""UniSparse (arXiv 2512.14082) in pure jnp: the references the kernels and the fast CPU path are
tested against. One causal sequence; queries [T, H, D], keys and values [T, K, D] with H = K * G (GQA);
T a multiple of the block size.

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

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True, slots=True)
class UniSparseConfig:
    """Block-sparse prefill parameters. The paper's body (defaults) was not recoverable; c_q = c_k = 8 and
    tau = 0.9 follow the related methods (XAttention, FlexPrefill) until measured on the real model."""

    block_size: int = dataclasses.field(default=64, metadata={"help": "tokens per query/key block"})
    c_q: int = dataclasses.field(default=8, metadata={"help": "queries pooled into one composite query"})
    c_k: int = dataclasses.field(default=8, metadata={"help": "keys pooled into one composite key"})
    tau: float = dataclasses.field(default=0.9, metadata={"help": "estimated attention mass to keep"})
    sink_blocks: int = dataclasses.field(default=1, metadata={"help": "leading key blocks always kept"})
    local_blocks: int = dataclasses.field(default=1, metadata={"help": "diagonal-and-before blocks always kept"})
    max_blocks: int = dataclasses.field(default=0, metadata={"help": "kept blocks per query block at most (0: no cap)"})

    def __post_init__(self) -> None:
        for name in ("block_size", "c_q", "c_k", "local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("c_q", "c_k"):
            if self.block_size % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} must divide block_size={self.block_size}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be an integer >= 0, got {self.sink_blocks!r}")
        if not isinstance(self.max_blocks, int) or self.max_blocks < 0:
            raise ValueError(f"max_blocks must be an integer >= 0, got {self.max_blocks!r}")


def _pool(x: jax.Array, factor: int) -> jax.Array:
    """[T, N, D] -> [T / factor, N, D]: the mean of each run of ``factor`` consecutive tokens."""
    t, n, d = x.shape
    return x.astype(jnp.float32).reshape(t // factor, factor, n, d).mean(axis=1)


def block_scores(q: jax.Array, k: jax.Array, config: UniSparseConfig) -> jax.Array:
    """[H, Nq, Nk] float32: per query block, the estimated share of its attention mass on each key block."""
    t, h, d = q.shape
    kv_heads = k.shape[1]
    s = config.block_size
    if t % s:
        raise ValueError(f"sequence length {t} is not a multiple of block_size {s}")
    qc = _pool(q, config.c_q)  # [T/cq, H, D]
    kc = jnp.repeat(_pool(k, config.c_k), h // kv_heads, axis=1)  # [T/ck, H, D]
    logits = jnp.einsum("ahd,bhd->hab", qc, kc) / jnp.sqrt(jnp.float32(d))
    # composite query a covers tokens [a*cq, (a+1)*cq); composite key b starts at b*ck: visible if it
    # starts at or before the query run's last token
    a = jnp.arange(qc.shape[0])[:, None]
    b = jnp.arange(kc.shape[0])[None, :]
    visible = b * config.c_k <= (a + 1) * config.c_q - 1
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)  # [H, T/cq, T/ck]
    nq, per_q, per_k = t // s, s // config.c_q, s // config.c_k
    return probs.reshape(h, nq, per_q, nq, per_k).sum(axis=(2, 4)) / per_q


def select_blocks(scores: jax.Array, config: UniSparseConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Kept blocks per (head, query block).

    Returns ``mask`` [H, Nq, Nk] bool, ``indices`` [H, Nq, Nk] int32 (kept key blocks ascending, then
    padding that repeats the last kept block) and ``counts`` [H, Nq] int32.
    """
    _, nq, nk = scores.shape
    i = jnp.arange(nq)[:, None]
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
                                     block_size: int) -> jax.Array:
    """Dense causal attention restricted to the kept (query block, key block) pairs; [T, H, D] in q's dtype."""
    t, h, d = q.shape
    group = h // k.shape[1]
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=1)
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=1)
    logits = jnp.einsum("thd,shd->hts", q.astype(jnp.float32), kf) / jnp.sqrt(jnp.float32(d))
    tokens = jnp.arange(t)
    allowed = (tokens[None, :] <= tokens[:, None])[None] & jnp.repeat(
        jnp.repeat(mask, block_size, axis=1), block_size, axis=2)
    probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    return jnp.einsum("hts,shd->thd", probs, vf).astype(q.dtype)


def block_sparse_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, counts: jax.Array,
                               block_size: int, max_kept: int, query_blocks_per_chunk: int = 8) -> jax.Array:
    """Block-sparse causal attention that only touches kept key blocks (the fast path where no Pallas
    kernel runs, e.g. CPU): per chunk of query blocks, gather each head's first ``max_kept`` kept key
    and value blocks and attend over them. Work and memory scale with ``max_kept``, not with the
    sequence; equal to ``block_sparse_attention_reference`` when every count is <= ``max_kept`` (select
    with ``max_blocks=max_kept`` to guarantee it). [T, H, D] in q's dtype."""
    t, h, d = q.shape
    kv_heads = k.shape[1]
    s = block_size
    nq = t // s
    chunk = min(query_blocks_per_chunk, nq)
    if nq % chunk:
        raise ValueError(f"{nq} query blocks are not a multiple of query_blocks_per_chunk={chunk}")
    kept = indices[:, :, :max_kept]  # [H, Nq, M]
    kb = jnp.asarray(k, jnp.float32).reshape(nq, s, kv_heads, d)
    vb = jnp.asarray(v, jnp.float32).reshape(nq, s, kv_heads, d)
    kv_of_head = jnp.arange(h) // (h // kv_heads)
    qb = jnp.asarray(q, jnp.float32).reshape(nq // chunk, chunk, s, h, d)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))

    def attend(args):
        q_chunk, kept_chunk, count_chunk, first = args  # [C, S, H, D], [H, C, M], [H, C], []
        keys = kb[kept_chunk, :, kv_of_head[:, None, None], :]  # [H, C, M, S, D]
        values = vb[kept_chunk, :, kv_of_head[:, None, None], :]
        logits = jnp.einsum("cxhd,hcmyd->hcxmy", q_chunk, keys) * scale  # [H, C, S, M, S]
        query_pos = (first + jnp.arange(chunk))[:, None] * s + jnp.arange(s)[None, :]  # [C, S]
        key_pos = kept_chunk[..., None] * s + jnp.arange(s)  # [H, C, M, S]
        valid = jnp.arange(max_kept)[None, None, :] < count_chunk[..., None]  # [H, C, M]
        allowed = (key_pos[:, :, None, :, :] <= query_pos[None, :, :, None, None]) & valid[:, :, None, :, None]
        logits = jnp.where(allowed, logits, -jnp.inf).reshape(h, chunk, s, max_kept * s)
        probs = jax.nn.softmax(logits, axis=-1).reshape(h, chunk, s, max_kept, s)
        return jnp.einsum("hcxmy,hcmyd->cxhd", probs, values)

    firsts = jnp.arange(0, nq, chunk)
    kept_chunks = kept.reshape(h, nq // chunk, chunk, max_kept).transpose(1, 0, 2, 3)
    count_chunks = counts.reshape(h, nq // chunk, chunk).transpose(1, 0, 2)
    out = jax.lax.map(attend, (qb, kept_chunks, count_chunks, firsts))  # [Nq/C, C, S, H, D]
    return out.reshape(t, h, d).astype(jnp.asarray(q).dtype)
