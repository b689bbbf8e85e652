"""Paged causal grouped-query attention for a step's flat token batch.

Axis letters: T tokens of the step, H query heads, K KV heads, D head_dim, P pages, L page size.
A step's tokens are laid out as ``num_decode`` decode rows (one token per request) followed by
prompt chunks (ragged, several tokens per request). Both parts read the paged KV through the
ragged paged-attention op: its Pallas kernel on GPU/TPU, its pure-jnp reference on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMeta:
    """Where a step's tokens write their K/V and what each of them reads.

    Dynamic (arrays): slot_mapping [T] (physical KV slot page * L + offset of every token; padding
    tokens point past the pool and are dropped); for the decode rows kv_lens [Bd], page_indices
    [Bd, Pd], num_seqs [1]; for the prompt chunks kv_lens [Bp], page_indices [Bp, Pp], cu_q_lens
    [Bp + 1] (offsets inside the prompt part), num_seqs [1].
    Static: the attention impl ('pallas' or 'reference'), interpret mode, and prefill_kv_tokens, a
    bound on the prompt requests' summed KV lengths (sizes the reference's gather).
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
    num_decode = meta.num_decode
    parts = []
    if num_decode:
        decode_cu = jnp.arange(num_decode + 1, dtype=jnp.int32)
        args = (q[:num_decode], k_pages, v_pages, meta.decode_kv_lens, meta.decode_page_indices + page_offset,
                decode_cu, meta.decode_num_seqs)
        if meta.impl == "pallas":
            parts.append(ragged_paged_attention(*args, interpret=meta.interpret))
        else:
            parts.append(ragged_paged_attention_reference(*args, max_q_len=1))
    if q.shape[0] > num_decode:
        args = (q[num_decode:], k_pages, v_pages, meta.prefill_kv_lens, meta.prefill_page_indices + page_offset,
                meta.prefill_cu_q_lens, meta.prefill_num_seqs)
        if meta.impl == "pallas":
            parts.append(ragged_paged_attention(*args, interpret=meta.interpret))
        else:
            parts.append(ragged_paged_attention_reference(*args, max_kv_tokens=meta.prefill_kv_tokens or None))
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
