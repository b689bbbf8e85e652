"""Paged causal grouped-query attention for a step's flat token batch, one metadata type per mode.

Axis letters: T tokens of the step, H query heads, K KV heads, D head_dim, P pages, L page size.

Ragged steps (``RaggedMeta``): ``num_decode`` decode rows (one token per request) followed by prompt
chunks (ragged, several tokens per request). Both parts read the paged KV through the ragged
paged-attention op: its Pallas kernel on GPU/TPU; on CPU the native kernels of
jaxinfer.cpu.paged_attention, which read the pages in place (the pure-jnp reference where the
kernels are unavailable, and on any platform the reference impl is asked for).

Blocked steps (``BlockedMeta``: one long prompt's chunk, no decodes) gather the request's KV from its
pages and run the blocked prefill backend instead: UniSparse block-sparse attention or the dense
attention with the same blocking (Pallas kernels on GPU/TPU, the XLA paths on CPU).

Tree steps (``TreeMeta``: speculative verification) hold B requests x N draft-tree nodes: each node
attends to its request's committed KV and to its own ancestors in the tree (tree attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import UniSparseConfig
from jaxinfer.cpu import paged_attention as cpu_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.tree_attention import tree_attention
from pallas_kernels.unisparse import dense_attention, sparse_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class StepMeta:
    """What every attention mode shares: where the step's tokens write their K/V and how it runs.

    slot_mapping [T]: physical KV slot (page * L + offset) of every token; padding tokens point past
    the pool and are dropped. Static: impl ('pallas' or 'reference') and interpret mode.
    """

    slot_mapping: jax.Array
    impl: str = dataclasses.field(default="reference", metadata=dict(static=True))
    interpret: bool = dataclasses.field(default=False, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class RaggedMeta(StepMeta):
    """A ragged step: Bd decode rows (one token each) then Bp prompt chunks, all over the paged KV.

    Decode rows: kv_lens [Bd], page_indices [Bd, Pd], num_seqs [1] (real rows). Prompt chunks: kv_lens
    [Bp], page_indices [Bp, Pp], cu_q_lens [Bp + 1] (offsets inside the prompt part), num_seqs [1].
    Static prefill_kv_tokens: a bound on the prompt chunks' summed KV lengths (sizes the reference's
    gather; 0: no bound).
    """

    decode_kv_lens: jax.Array
    decode_page_indices: jax.Array
    decode_num_seqs: jax.Array
    prefill_kv_lens: jax.Array
    prefill_page_indices: jax.Array
    prefill_cu_q_lens: jax.Array
    prefill_num_seqs: jax.Array
    prefill_kv_tokens: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def num_decode(self) -> int:
        return self.decode_kv_lens.shape[0]

    @classmethod
    def prompts(cls, slot_mapping, kv_lens, page_indices, cu_q_lens, **static) -> RaggedMeta:
        """A step of prompt chunks only (numpy arrays)."""
        return cls(slot_mapping=slot_mapping, decode_kv_lens=np.zeros(0, np.int32),
                   decode_page_indices=np.zeros((0, 1), np.int32), decode_num_seqs=np.zeros(1, np.int32),
                   prefill_kv_lens=kv_lens, prefill_page_indices=page_indices, prefill_cu_q_lens=cu_q_lens,
                   prefill_num_seqs=np.array([len(kv_lens)], np.int32), **static)

    @classmethod
    def decodes(cls, slot_mapping, kv_lens, page_indices, **static) -> RaggedMeta:
        """A step of decode rows only (numpy arrays)."""
        return cls(slot_mapping=slot_mapping, decode_kv_lens=kv_lens, decode_page_indices=page_indices,
                   decode_num_seqs=np.array([len(kv_lens)], np.int32), prefill_kv_lens=np.zeros(1, np.int32),
                   prefill_page_indices=np.zeros((1, 1), np.int32), prefill_cu_q_lens=np.zeros(2, np.int32),
                   prefill_num_seqs=np.zeros(1, np.int32), **static)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockedMeta(StepMeta):
    """A blocked step: one long prompt's chunk (Tq tokens, padded to whole blocks) through the blocked
    prefill backend over the request's KV gathered from its pages.

    kv_len [] (the request's KV length after the chunk), q_len [] (the chunk's real tokens; it sits
    at positions kv_len - q_len..), page_indices [P] (the request's pages). Static: kv_tokens (the
    KV bucket gathered, >= kv_len), mode ('sparse' or 'dense_blocked') and its UniSparse parameters.
    """

    kv_len: jax.Array
    q_len: jax.Array
    page_indices: jax.Array
    kv_tokens: int = dataclasses.field(metadata=dict(static=True))
    mode: str = dataclasses.field(metadata=dict(static=True))
    unisparse: UniSparseConfig = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TreeMeta(StepMeta):
    """A tree step (speculative verification): B requests x N draft-tree nodes, token b * N + j.

    Node j of request b attends to the request's committed KV (kv_lens [B] slots, the tree excluded,
    through page_indices [B, P]) and to its own ancestors-or-self in the tree (tree_mask [B, N, N]).
    Static kv_tokens: a bound on the KV slots one request reads (committed + tree; 0: no bound).
    """

    kv_lens: jax.Array
    page_indices: jax.Array
    tree_mask: jax.Array
    kv_tokens: int = dataclasses.field(default=0, metadata=dict(static=True))


AttentionMeta = RaggedMeta | BlockedMeta | TreeMeta


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
    """q [T, H, D] of the step's tokens (K/V already written) -> [T, H, D] float32, by the step's mode.

    page_offset: added to every page index (the layer's first page in a pool shared by all layers).
    """
    if isinstance(meta, BlockedMeta):
        return blocked_prefill_attention(q, k_pages, v_pages, meta, page_offset)
    if isinstance(meta, TreeMeta):
        return tree_step_attention(q, k_pages, v_pages, meta, page_offset)
    return ragged_attention(q, k_pages, v_pages, meta, page_offset)


def ragged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: RaggedMeta,
                     page_offset: jax.Array | int = 0) -> jax.Array:
    """A ragged step: the decode rows, then the prompt chunks."""
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


def tree_step_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: TreeMeta,
                        page_offset: jax.Array | int = 0) -> jax.Array:
    """A tree step: q [B * N, H, D], node j of request b at row b * N + j."""
    num_rows, num_nodes = meta.tree_mask.shape[:2]
    nodes = q.reshape(num_rows, num_nodes, *q.shape[1:])
    if meta.impl == "pallas":
        out = tree_attention(nodes, k_pages, v_pages, meta.kv_lens, meta.page_indices + page_offset, meta.tree_mask,
                             interpret=meta.interpret)
    else:  # the CPU kernel (each node exactly as the decode step it stands for), the jnp reference elsewhere
        out = cpu_attention.tree_attention(nodes, k_pages, v_pages, meta.kv_lens, meta.page_indices, meta.tree_mask,
                                           page_offset, max_kv_tokens=meta.kv_tokens or None)
    return out.reshape(q.shape)


def blocked_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: BlockedMeta,
                              page_offset: jax.Array | int = 0) -> jax.Array:
    """A blocked step: q [Tq, H, D], the chunk of one prompt (padded to a block multiple) at positions
    kv_len - q_len.., over the request's KV [kv_tokens] gathered from its pages -> [Tq, H, D] f32."""
    kv_heads, _, page_size, head_dim = k_pages.shape
    kv_tokens = meta.kv_tokens
    pages = meta.page_indices[:-(-kv_tokens // page_size)] + page_offset

    def gather(pool):
        return pool[:, pages].reshape(kv_heads, -1, head_dim)[:, :kv_tokens].transpose(1, 0, 2)  # [Tk, K, D]

    q_start = meta.kv_len - meta.q_len
    impl = "pallas" if meta.impl == "pallas" else "xla"
    config = meta.unisparse
    if meta.mode == "sparse":
        out = sparse_attention(q, gather(k_pages), gather(v_pages), config, q_start=q_start, kv_len=meta.kv_len,
                               impl=impl, interpret=meta.interpret)
    else:
        out = dense_attention(q, gather(k_pages), gather(v_pages), config.block_size, q_start=q_start,
                              kv_len=meta.kv_len, impl=impl, interpret=meta.interpret)
    return out.astype(jnp.float32)
