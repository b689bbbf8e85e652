"""Paged causal grouped-query attention for a step's flat token batch.

Axis letters: T tokens of the step, H query heads, K KV heads, D head_dim, P pages, L page size.
A step's tokens are laid out as ``num_decode`` decode rows (one token per request) followed by
prompt chunks (ragged, several tokens per request). Both parts read the paged KV through the
ragged paged-attention op: its Pallas kernel on GPU/TPU; on CPU the native kernels of
jaxinfer.cpu.paged_attention, which read the pages in place (the pure-jnp reference where the
kernels are unavailable, and on any platform the reference impl is asked for).

Blocked steps (one long prompt's chunk, no decodes) gather the request's KV from its pages and run
the blocked prefill backend instead: UniSparse block-sparse attention or the dense attention with
the same blocking (Pallas kernels on GPU/TPU, the XLA paths on CPU).

Tree steps (speculative verification) hold B requests x N draft-tree nodes: each node attends to its
request's committed KV and to its own ancestors in the tree (tree attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.config import UniSparseConfig
from jaxinfer.cpu import paged_attention as cpu_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.tree_attention import tree_attention
from pallas_kernels.unisparse import dense_attention, sparse_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMeta:
    """Where a step's tokens write their K/V and what each of them reads.

    Dynamic (arrays): slot_mapping [T] (physical KV slot page * L + offset of every token; padding
    tokens point past the pool and are dropped); for the decode rows kv_lens [Bd], page_indices
    [Bd, Pd], num_seqs [1]; for the prompt chunks kv_lens [Bp], page_indices [Bp, Pp], cu_q_lens
    [Bp + 1] (offsets inside the prompt part), num_seqs [1].
    Static: the attention impl ('pallas' or 'reference'), interpret mode, prefill_kv_tokens, a
    bound on the prompt requests' summed KV lengths (sizes the reference's gather), and for blocked
    steps the backend ('sparse' or 'dense_blocked') with its UniSparse parameters.
    Tree steps: tree_mask [B, N, N] (ancestor-or-self of each request's nodes); the decode fields
    describe the B requests (kv_lens = committed length, the tree excluded) and prefill_kv_tokens
    bounds the KV slots one request reads (committed + tree).
    """

    slot_mapping: jax.Array
    decode_kv_lens: jax.Array
    decode_page_indices: jax.Array
    decode_num_seqs: jax.Array
    prefill_kv_lens: jax.Array
    prefill_page_indices: jax.Array
    prefill_cu_q_lens: jax.Array
    prefill_num_seqs: jax.Array
    prefill_kv_tokens: int = dataclasses.field(default=0, metadata=dict(static=True))
    impl: str = dataclasses.field(default="reference", metadata=dict(static=True))
    interpret: bool = dataclasses.field(default=False, metadata=dict(static=True))
    blocked_mode: str = dataclasses.field(default="", metadata=dict(static=True))
    unisparse: UniSparseConfig | None = dataclasses.field(default=None, metadata=dict(static=True))
    tree_mask: jax.Array | None = None

    @property
    def num_decode(self) -> int:
        return self.decode_kv_lens.shape[0]


def write_kv(pages: jax.Array, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Store new [T, K, D] into pages [K, P, L, D] at flat slots slot_mapping[T] (out of range: dropped).

    Indexes the 4-D pages as (page, offset) directly: reshaping the pool to [K, P*L, D] around the
    scatter makes XLA copy the whole pool inside the layer loop.
    """
    page_size = pages.shape[2]
    return pages.at[:, slot_mapping // page_size, slot_mapping % page_size].set(
        new.transpose(1, 0, 2).astype(pages.dtype), mode="drop")


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMeta,
                    page_offset: jax.Array | int = 0) -> jax.Array:
    """q [T, H, D] of the step's tokens (K/V already written) -> [T, H, D] float32.

    page_offset: added to every page index (the layer's first page in a pool shared by all layers).
    """
    if meta.blocked_mode:
        return blocked_prefill_attention(q, k_pages, v_pages, meta, page_offset)
    if meta.tree_mask is not None:
        num_rows, num_nodes = meta.tree_mask.shape[:2]
        args = (q.reshape(num_rows, num_nodes, *q.shape[1:]), k_pages, v_pages, meta.decode_kv_lens,
                meta.decode_page_indices + page_offset, meta.tree_mask)
        if meta.impl == "pallas":
            out = tree_attention(*args, interpret=meta.interpret)
        else:  # the CPU kernel (each node exactly as the decode step it stands for), the jnp reference elsewhere
            out = cpu_attention.tree_attention(*args[:4], meta.decode_page_indices, meta.tree_mask, page_offset,
                                               max_kv_tokens=meta.prefill_kv_tokens or None)
        return out.reshape(q.shape)
    num_decode = meta.num_decode
    parts = []
    if num_decode:
        if meta.impl == "pallas":
            decode_cu = jnp.arange(num_decode + 1, dtype=jnp.int32)
            parts.append(ragged_paged_attention(q[:num_decode], k_pages, v_pages, meta.decode_kv_lens,
                                                meta.decode_page_indices + page_offset, decode_cu,
                                                meta.decode_num_seqs, interpret=meta.interpret))
        else:  # the CPU kernel (pages read in place), the jnp reference elsewhere
            parts.append(cpu_attention.paged_decode_attention(q[:num_decode], k_pages, v_pages, meta.decode_kv_lens,
                                                              meta.decode_page_indices, meta.decode_num_seqs,
                                                              page_offset))
    if q.shape[0] > num_decode:
        if meta.impl == "pallas":
            parts.append(ragged_paged_attention(q[num_decode:], k_pages, v_pages, meta.prefill_kv_lens,
                                                meta.prefill_page_indices + page_offset, meta.prefill_cu_q_lens,
                                                meta.prefill_num_seqs, interpret=meta.interpret))
        else:
            parts.append(cpu_attention.ragged_paged_attention(
                q[num_decode:], k_pages, v_pages, meta.prefill_kv_lens, meta.prefill_page_indices,
                meta.prefill_cu_q_lens, meta.prefill_num_seqs, page_offset,
                max_kv_tokens=meta.prefill_kv_tokens or None))
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def blocked_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMeta,
                              page_offset: jax.Array | int = 0) -> jax.Array:
    """A blocked step: q [Tq, H, D], the chunk of one prompt (padded to a block multiple) at positions
    kv_len - q_len.., over the request's KV [prefill_kv_tokens] gathered from its pages -> [Tq, H, D] f32."""
    kv_heads, _, page_size, head_dim = k_pages.shape
    kv_tokens = meta.prefill_kv_tokens
    pages = meta.prefill_page_indices[0, :-(-kv_tokens // page_size)] + page_offset

    def gather(pool):
        return pool[:, pages].reshape(kv_heads, -1, head_dim)[:, :kv_tokens].transpose(1, 0, 2)  # [Tk, K, D]

    kv_len = meta.prefill_kv_lens[0]
    q_start = kv_len - meta.prefill_cu_q_lens[1]
    impl = "pallas" if meta.impl == "pallas" else "xla"
    config = meta.unisparse
    if meta.blocked_mode == "sparse":
        out = sparse_attention(q, gather(k_pages), gather(v_pages), config, q_start=q_start, kv_len=kv_len,
                               impl=impl, interpret=meta.interpret)
    else:
        out = dense_attention(q, gather(k_pages), gather(v_pages), config.block_size, q_start=q_start,
                              kv_len=kv_len, impl=impl, interpret=meta.interpret)
    return out.astype(jnp.float32)
