"""UniSparse prefill attention end to end: composite-token block scores, block selection, block-sparse
attention; and the dense attention with the same blocking that it is measured against.

``impl`` picks the implementation of each stage: 'xla' (the CPU fast path: jnp scores and selection,
``block_sparse_attention_xla``), 'pallas' (the GPU/TPU kernels) or 'reference' (the masked dense
references, for tests). Contract as in ``reference``: q [Tq, H, D] at positions q_start.., k and v
[Tk, K, D], keys at or after kv_len ignored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.unisparse.block_scores_kernel import block_scores_pallas
from pallas_kernels.unisparse.block_sparse_attention import block_sparse_attention, causal_block_lists
from pallas_kernels.unisparse.reference import (
    Sparsity,
    block_scores,
    block_sparse_attention_reference,
    select_blocks,
)
from pallas_kernels.unisparse.xla import block_sparse_attention_xla, chunked_block_scores, dense_blocked_attention_xla

IMPLS = ("xla", "pallas", "reference")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """The kept blocks: one list per query head, or per KV head when the config shares them."""

    mask: jax.Array  # [L, Nq, Nk] bool
    indices: jax.Array  # [L, Nq, Nk] int32, ascending kept blocks then padding
    counts: jax.Array  # [L, Nq] int32

    def per_query_head(self, num_heads: int) -> Selection:
        """The same selection with one list per query head (what the kernels and references take)."""
        repeat = num_heads // self.mask.shape[0]
        return Selection(*(jnp.repeat(x, repeat, axis=0) for x in (self.mask, self.indices, self.counts)))

    def density(self, block_size: int, q_start: jax.Array | int = 0,
                kv_len: jax.Array | int | None = None) -> jax.Array:
        """Kept blocks over causal blocks, over the query blocks that start before kv_len."""
        _, nq, nk = self.mask.shape
        kv_len = nk * block_size if kv_len is None else kv_len
        block = q_start // block_size + jnp.arange(nq)
        real = block * block_size < kv_len
        causal = jnp.minimum(block + 1, -(-kv_len // block_size))
        kept = jnp.where(real, self.counts, 0).sum()
        return kept / (jnp.where(real, causal, 0).sum() * self.counts.shape[0])


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown UniSparse impl {impl!r} (choose from {', '.join(IMPLS)})")


def select(q: jax.Array, k: jax.Array, config: Sparsity, *, q_start: jax.Array | int = 0,
           kv_len: jax.Array | int | None = None, impl: str = "xla", interpret: bool | None = None) -> Selection:
    """Score block pairs on composite tokens and keep blocks up to the mass tau (sink and local always)."""
    _check_impl(impl)
    h, kv_heads = q.shape[1], k.shape[1]
    pooled_heads = config.c_h or h // kv_heads
    if pooled_heads > 1:  # head-level compression: consecutive query heads of one KV group averaged
        if (h // kv_heads) % pooled_heads:
            raise ValueError(f"c_h={config.c_h} must divide the {h // kv_heads} query heads per KV head")
        q = q.reshape(q.shape[0], h // pooled_heads, pooled_heads, q.shape[2]).mean(axis=2)
    if impl == "pallas":
        scores = block_scores_pallas(q, k, config, q_start, kv_len, interpret=interpret)
    elif impl == "xla":
        scores = chunked_block_scores(q, k, config, q_start, kv_len)
    else:
        scores = block_scores(q, k, config, q_start, kv_len)
    if config.share_kv_heads:  # one map per KV head: the mean of its (compressed) query heads' maps
        scores = scores.reshape(kv_heads, -1, *scores.shape[1:]).mean(axis=1)
    elif pooled_heads > 1:  # one list per query head: each head takes its compressed group's map
        scores = jnp.repeat(scores, pooled_heads, axis=0)
    return Selection(*select_blocks(scores, config, q_start))


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, config: Sparsity, *,
                     q_start: jax.Array | int = 0, kv_len: jax.Array | int | None = None, impl: str = "xla",
                     interpret: bool | None = None, selection: Selection | None = None) -> jax.Array:
    """UniSparse attention of one prompt (chunk): [Tq, H, D] in q's dtype."""
    if selection is None:
        selection = select(q, k, config, q_start=q_start, kv_len=kv_len, impl=impl, interpret=interpret)
    h = q.shape[1]
    if impl == "xla":
        return block_sparse_attention_xla(q, k, v, selection.mask, block_size=config.block_size, q_start=q_start,
                                          kv_len=kv_len, query_blocks_per_item=_items(q, config))
    full = selection.per_query_head(h)
    if impl == "pallas":
        return block_sparse_attention(q, k, v, full.indices, full.counts, block_size=config.block_size,
                                      q_start=q_start, kv_len=kv_len, interpret=interpret)
    return block_sparse_attention_reference(q, k, v, full.mask, config.block_size, q_start)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int, *, q_start: jax.Array | int = 0,
                    kv_len: jax.Array | int | None = None, impl: str = "xla",
                    interpret: bool | None = None) -> jax.Array:
    """Causal attention with the same blocking (the fair baseline): [Tq, H, D] in q's dtype."""
    _check_impl(impl)
    if impl == "xla":
        return dense_blocked_attention_xla(q, k, v, block_size=block_size, q_start=q_start, kv_len=kv_len,
                                           query_blocks_per_item=_items(q, None, block_size))
    nq, nk = q.shape[0] // block_size, k.shape[0] // block_size
    if impl == "pallas":
        indices, counts = causal_block_lists(q.shape[1], nq, nk, q_start // block_size)
        return block_sparse_attention(q, k, v, indices, counts, block_size=block_size, q_start=q_start,
                                      kv_len=kv_len, interpret=interpret)
    mask = jnp.ones((q.shape[1], nq, nk), bool)
    return block_sparse_attention_reference(q, k, v, mask, block_size, q_start)


def _items(q: jax.Array, config: Sparsity | None, block_size: int | None = None) -> int:
    """Query blocks per XLA work item: 4 (measured best on a 2-core CPU at 8K), fewer for short chunks."""
    nq = q.shape[0] // (config.block_size if config else block_size)
    for items in (4, 2, 1):
        if nq % items == 0:
            return items
    return 1
