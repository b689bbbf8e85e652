"""UniSparse attention in plain XLA: the fast path where no Pallas kernel runs (CPU), and the dense
blocked path it is measured against. Same contract as ``reference`` (see its docstring).

Both walk the same blocking: work items of ``query_blocks_per_item`` consecutive query blocks, each
looping over key blocks ``blocks_per_step`` at a time with an online softmax (f32). The loop's trip
count is dynamic, so work is proportional to what each item really attends to:
- ``block_sparse_attention_xla``: one item per (query head, chunk of query blocks); every step
  gathers each query block's next kept key blocks, so unselected blocks are never read or multiplied;
  the item runs as many steps as its largest kept count needs.
- ``dense_blocked_attention_xla``: one item per (KV head, chunk); steps slice contiguous key ranges up
  to the chunk's last causal block, so only the causal triangle (rounded up to steps) is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.unisparse.reference import check_blocking

NEG_INF = -1e30


def _online_softmax_step(carry, logits, visible, values, value_spec: str):
    """One flash step: fold logits [..., X, Y] (masked by visible) and values into (m, l, acc)."""
    m_prev, l_prev, acc_prev = carry
    logits = jnp.where(visible, logits, NEG_INF)
    m_next = jnp.maximum(m_prev, logits.max(axis=-1, keepdims=True))
    probs = jnp.where(visible, jnp.exp(logits - m_next), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + probs.sum(axis=-1, keepdims=True)
    acc_next = alpha * acc_prev + jnp.einsum(value_spec, probs, values)
    return m_next, l_next, acc_next


def _finish(l_final, acc):
    return acc / jnp.where(l_final == 0.0, 1.0, l_final)


def _items(nq: int, query_blocks_per_item: int) -> int:
    chunk = min(query_blocks_per_item, nq)
    if nq % chunk:
        raise ValueError(f"{nq} query blocks are not a multiple of query_blocks_per_item={chunk}")
    return chunk


def block_sparse_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, counts: jax.Array,
                               *, block_size: int, q_start: jax.Array | int = 0, kv_len: jax.Array | int | None = None,
                               query_blocks_per_item: int = 8, blocks_per_step: int = 4) -> jax.Array:
    """Attention of each query block over its kept key blocks only; [Tq, H, D] in q's dtype.

    ``indices`` [L, Nq, Nk] and ``counts`` [L, Nq] hold one list per query head (L = H) or one per KV
    head shared by its query heads (L = K, the cheaper layout: each gathered block serves G heads).
    """
    check_blocking(q, k, block_size)
    tq, h, d = q.shape
    tk, kv_heads, _ = k.shape
    s, g = block_size, blocks_per_step
    nq, nk = tq // s, tk // s
    c = _items(nq, query_blocks_per_item)
    kv_len = tk if kv_len is None else kv_len
    lists = indices.shape[0]
    if lists not in (h, kv_heads) or indices.shape != (lists, nq, nk) or counts.shape != (lists, nq):
        raise ValueError(f"expected indices [H or K, {nq}, {nk}] and counts [H or K, {nq}] for {h} query and "
                         f"{kv_heads} KV heads, got {indices.shape}, {counts.shape}")
    per_list = h // lists  # query heads served by one list
    width = -(-nk // g) * g
    indices = jnp.pad(jnp.asarray(indices), ((0, 0), (0, 0), (0, width - nk)), mode="edge")
    kb = jnp.asarray(k, jnp.float32).reshape(nk, s, kv_heads, d).transpose(2, 0, 1, 3)  # [K, Nk, S, D]
    vb = jnp.asarray(v, jnp.float32).reshape(nk, s, kv_heads, d).transpose(2, 0, 1, 3)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    # items: (list, chunk of C query blocks); q rows [I, C, R, D] with R = per_list * S (head-major)
    items = lists * (nq // c)
    q_items = (jnp.asarray(q, jnp.float32) * scale).reshape(nq // c, c, s, lists, per_list, d).transpose(
        3, 0, 1, 4, 2, 5).reshape(items, c, per_list * s, d)
    item_lists = indices.reshape(items, c, width)
    item_counts = jnp.asarray(counts).reshape(items, c)
    item_kv = jnp.repeat(jnp.arange(lists) * per_list // (h // kv_heads), nq // c)
    item_first = jnp.tile(jnp.arange(nq // c) * c, lists)  # first query block of the item
    x = jnp.arange(s)
    row_pos = jnp.tile(x, per_list)  # [R] offset of each row inside its query block

    def attend(args):
        q_item, kept, kept_count, kv_head, first = args
        query_pos = (q_start + (first + jnp.arange(c))[:, None] * s + row_pos)[:, :, None, None]  # [C, R, 1, 1]

        def block(array, index):
            return lax.dynamic_slice(array, (kv_head, index, 0, 0), (1, 1, s, d))[0, 0]

        def step(carry):
            n, state = carry
            blocks = lax.dynamic_slice_in_dim(kept, n * g, g, axis=1)  # [C, G]
            # one contiguous slice per block: cheaper on CPU than a gather of rows
            flat = blocks.reshape(c * g)
            keys = kb[kv_head, flat].reshape(c, g * s, d)
            values = vb[kv_head, flat].reshape(c, g * s, d)
            logits = jnp.einsum("crd,cyd->cry", q_item, keys).reshape(c, -1, g, s)
            key_pos = blocks[:, None, :, None] * s + x  # [C, 1, G, S]
            slot = n * g + jnp.arange(g)
            visible = ((key_pos <= query_pos) & (key_pos < kv_len)
                       & (slot[None, None, :, None] < kept_count[:, None, None, None]))
            rows = q_item.shape[1]
            state = _online_softmax_step(state, logits.reshape(c, rows, g * s), visible.reshape(c, rows, g * s),
                                         values, "cry,cyd->crd")
            return n + 1, state

        steps = (kept_count.max() + g - 1) // g
        rows = q_item.shape[1]
        init = (jnp.full((c, rows, 1), NEG_INF), jnp.zeros((c, rows, 1)), jnp.zeros((c, rows, d)))
        _, (_, l_final, acc) = lax.while_loop(lambda carry: carry[0] < steps, step, (0, init))
        return _finish(l_final, acc)

    out = lax.map(attend, (q_items, item_lists, item_counts, item_kv, item_first))  # [I, C, R, D]
    out = out.reshape(lists, nq // c, c, per_list, s, d).transpose(1, 2, 4, 0, 3, 5)
    return out.reshape(tq, h, d).astype(jnp.asarray(q).dtype)


def dense_blocked_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int,
                                q_start: jax.Array | int = 0, kv_len: jax.Array | int | None = None,
                                query_blocks_per_item: int = 8, blocks_per_step: int = 4) -> jax.Array:
    """Causal attention with the same blocking, over every causal key block; [Tq, H, D] in q's dtype."""
    check_blocking(q, k, block_size)
    tq, h, d = q.shape
    tk, kv_heads, _ = k.shape
    group = h // kv_heads
    s, g = block_size, blocks_per_step
    nq = tq // s
    c = _items(nq, query_blocks_per_item)
    kv_len = tk if kv_len is None else kv_len
    span = g * s
    padded = -(-tk // span) * span
    kf = jnp.pad(jnp.asarray(k, jnp.float32), ((0, padded - tk), (0, 0), (0, 0))).transpose(1, 0, 2)  # [K, Tk', D]
    vf = jnp.pad(jnp.asarray(v, jnp.float32), ((0, padded - tk), (0, 0), (0, 0))).transpose(1, 0, 2)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    items = kv_heads * (nq // c)
    # items: (KV head, chunk); q [I, G', C*S, D] with the KV head's query heads together
    q_items = (jnp.asarray(q, jnp.float32) * scale).reshape(nq // c, c * s, kv_heads, group, d).transpose(
        2, 0, 3, 1, 4).reshape(items, group, c * s, d)
    item_kv = jnp.repeat(jnp.arange(kv_heads), nq // c)
    item_first = jnp.tile(jnp.arange(nq // c) * c, kv_heads)
    rows = jnp.arange(c * s)

    def attend(args):
        q_item, kv_head, first = args
        query_pos = (q_start + first * s + rows)[:, None]  # [C*S, 1]
        last_pos = jnp.minimum(q_start + (first + c) * s, kv_len)  # keys below this can be visible

        def step(carry):
            n, state = carry
            keys = lax.dynamic_slice_in_dim(kf[kv_head], n * span, span, axis=0)  # [span, D]
            values = lax.dynamic_slice_in_dim(vf[kv_head], n * span, span, axis=0)
            logits = jnp.einsum("gxd,yd->gxy", q_item, keys)
            key_pos = n * span + jnp.arange(span)[None, :]
            visible = ((key_pos <= query_pos) & (key_pos < kv_len))[None]
            return n + 1, _online_softmax_step(state, logits, visible, values, "gxy,yd->gxd")

        steps = (last_pos + span - 1) // span
        init = (jnp.full((group, c * s, 1), NEG_INF), jnp.zeros((group, c * s, 1)), jnp.zeros((group, c * s, d)))
        _, (_, l_final, acc) = lax.while_loop(lambda carry: carry[0] < steps, step, (0, init))
        return _finish(l_final, acc)

    out = lax.map(attend, (q_items, item_kv, item_first))  # [I, G', C*S, D]
    out = out.reshape(kv_heads, nq // c, group, c * s, d).transpose(1, 3, 0, 2, 4)
    return out.reshape(tq, h, d).astype(jnp.asarray(q).dtype)
