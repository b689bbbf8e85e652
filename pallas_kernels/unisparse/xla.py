"""UniSparse attention in plain XLA: the fast path where no Pallas kernel runs (CPU), and the dense
blocked path it is measured against. Same contract as ``reference`` (see its docstring).

Both walk the same blocking: work items of ``query_blocks_per_item`` consecutive query blocks, each
looping over key blocks ``blocks_per_step`` at a time with an online softmax (f32). The loop's trip
count is dynamic, so work is proportional to what each item really attends to:
- ``block_sparse_attention_xla``: one item per (selection list, chunk of query blocks); steps gather
  the next kept key blocks of the chunk's union, so blocks no query block of the chunk kept are never
  read or multiplied.
- ``dense_blocked_attention_xla``: one item per (KV head, chunk); steps slice contiguous key ranges up
  to the chunk's last causal block, so only the causal triangle (rounded up to steps) is computed.

``chunked_block_scores`` is the block scoring of ``reference`` in chunks of query blocks, so that long
prompts' composite logits fit in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.unisparse.reference import Sparsity, block_scores, check_blocking

NEG_INF = -1e30


def _biased_softmax_step(carry, logits, values):
    """A flash step whose masked logits already carry NEG_INF. A row that has seen only masked keys
    accumulates junk with m = NEG_INF; its first visible key rescales that junk by exp(NEG_INF - m) = 0.
    Every real query row sees its own key, so no junk survives in rows that are read back."""
    m_prev, l_prev, acc_prev = carry
    m_next = jnp.maximum(m_prev, logits.max(axis=-1, keepdims=True))
    probs = jnp.exp(logits - m_next)
    alpha = jnp.exp(m_prev - m_next)
    return m_next, alpha * l_prev + probs.sum(axis=-1, keepdims=True), alpha * acc_prev + probs @ values


def _finish(l_final, acc):
    return acc / jnp.where(l_final == 0.0, 1.0, l_final)


def _items(nq: int, query_blocks_per_item: int) -> int:
    chunk = min(query_blocks_per_item, nq)
    if nq % chunk:
        raise ValueError(f"{nq} query blocks are not a multiple of query_blocks_per_item={chunk}")
    return chunk


def block_sparse_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block_size: int,
                               q_start: jax.Array | int = 0, kv_len: jax.Array | int | None = None,
                               query_blocks_per_item: int = 4, blocks_per_step: int = 4) -> jax.Array:
    """Attention of each query block over its kept key blocks only; [Tq, H, D] in q's dtype.

    ``mask`` [L, Nq, Nk] holds one selection per query head (L = H) or one per KV head shared by its
    query heads (L = K, the cheaper layout). A work item (list, chunk of query blocks) gathers the
    union of its query blocks' kept key blocks, ``blocks_per_step`` at a time, and masks each query
    block to its own; the union keeps the matmuls as large as the dense path's.
    """
    check_blocking(q, k, block_size)
    tq, h, d = q.shape
    tk, kv_heads, _ = k.shape
    s, g = block_size, blocks_per_step
    nq, nk = tq // s, tk // s
    c = _items(nq, query_blocks_per_item)
    kv_len = tk if kv_len is None else kv_len
    lists = mask.shape[0]
    if lists not in (h, kv_heads) or mask.shape != (lists, nq, nk):
        raise ValueError(f"expected a mask [H or K, {nq}, {nk}] for {h} query and {kv_heads} KV heads, "
                         f"got {mask.shape}")
    per_list = h // lists  # query heads served by one list
    items = lists * (nq // c)
    item_mask = jnp.asarray(mask).reshape(items, c, nk)
    union = item_mask.any(axis=1)  # [I, Nk]
    union_counts = union.sum(axis=1).astype(jnp.int32)
    width = -(-nk // g) * g
    order = jnp.argsort(jnp.where(union, jnp.arange(nk), nk + jnp.arange(nk)), axis=1, stable=True)
    union_lists = jnp.pad(order.astype(jnp.int32), ((0, 0), (0, width - nk)))  # kept blocks first, ascending
    kb = jnp.asarray(k, jnp.float32).reshape(nk, s, kv_heads, d).transpose(2, 0, 1, 3)  # [K, Nk, S, D]
    vb = jnp.asarray(v, jnp.float32).reshape(nk, s, kv_heads, d).transpose(2, 0, 1, 3)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    # q rows of an item: [C * R, D] with R = per_list * S (query block, head, token)
    rows = per_list * s
    q_items = (jnp.asarray(q, jnp.float32) * scale).reshape(nq // c, c, s, lists, per_list, d).transpose(
        3, 0, 1, 4, 2, 5).reshape(items, c * rows, d)
    item_kv = jnp.repeat(jnp.arange(lists) * per_list // (h // kv_heads), nq // c)
    item_first = jnp.tile(jnp.arange(nq // c) * c, lists)  # first query block of the item
    x = jnp.arange(s)
    triangle = jnp.where(x[None, :] <= jnp.tile(x, per_list)[:, None], 0.0, NEG_INF)  # [R, S] diagonal block
    tiles = jnp.tile(triangle, (c, g))  # [C*R, G*S]
    expand_rows = (jnp.arange(c * rows)[:, None] // rows == jnp.arange(c)[None, :]).astype(jnp.float32)  # [C*R, C]
    expand_cols = (jnp.arange(g)[:, None] == jnp.arange(g * s)[None, :] // s).astype(jnp.float32)  # [G, G*S]

    def attend(args):
        q_item, blocks_kept, union_list, count, kv_head, first = args
        query_block = q_start // s + first + jnp.arange(c)  # [C] sequence block of each query block

        def step(carry):
            n, state = carry
            blocks = lax.dynamic_slice_in_dim(union_list, n * g, g)  # [G]
            keys = kb[kv_head, blocks].reshape(g * s, d)
            values = vb[kv_head, blocks].reshape(g * s, d)
            # an additive mask over [C, R, G, S] (a free view of [C*R, G*S]): a block counts for a query
            # block when it kept it; inside the diagonal block only keys at or before the query. Keys past
            # kv_len sit only in blocks a real query's diagonal cuts, so causality already hides them.
            own = (blocks_kept[:, blocks] & (n * g + jnp.arange(g) < count)).astype(jnp.float32)  # [C, G]
            diagonal = (blocks[None, :] == query_block[:, None]).astype(jnp.float32)  # [C, G]
            # block flags expanded to [C*R, G*S] by one-hot products (2-D ops stay fast on XLA:CPU)
            bias = (expand_rows @ (own - 1.0) @ expand_cols) * -NEG_INF + (expand_rows @ diagonal @ expand_cols) * tiles
            logits = q_item @ keys.T + bias  # [C*R, G*S]
            return n + 1, _biased_softmax_step(state, logits, values)

        init = (jnp.full((c * rows, 1), NEG_INF), jnp.zeros((c * rows, 1)), jnp.zeros((c * rows, d)))
        _, (_, l_final, acc) = lax.while_loop(lambda carry: carry[0] * g < count, step, (0, init))
        return _finish(l_final, acc)

    out = lax.map(attend, (q_items, item_mask, union_lists, union_counts, item_kv, item_first))  # [I, C*R, D]
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
        2, 0, 3, 1, 4).reshape(items, group * c * s, d)
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
            key_pos = n * span + jnp.arange(span)[None, :]
            bias = jnp.where((key_pos <= query_pos) & (key_pos < kv_len), 0.0, NEG_INF)  # [C*S, span]
            logits = ((q_item @ keys.T).reshape(group, c * s, span) + bias).reshape(group * c * s, span)
            return n + 1, _biased_softmax_step(state, logits, values)

        steps = (last_pos + span - 1) // span
        rows_all = group * c * s
        init = (jnp.full((rows_all, 1), NEG_INF), jnp.zeros((rows_all, 1)), jnp.zeros((rows_all, d)))
        _, (_, l_final, acc) = lax.while_loop(lambda carry: carry[0] < steps, step, (0, init))
        return _finish(l_final, acc)

    out = lax.map(attend, (q_items, item_kv, item_first))  # [I, G', C*S, D]
    out = out.reshape(kv_heads, nq // c, group, c * s, d).transpose(1, 3, 0, 2, 4)
    return out.reshape(tq, h, d).astype(jnp.asarray(q).dtype)


def chunked_block_scores(q, k, config: Sparsity, q_start, kv_len, max_logits: int = 1 << 25):
    """``block_scores`` over chunks of query blocks, so the composite logits held at once stay under
    ``max_logits`` floats (a 32K prompt at c_q = 1 would need gigabytes); each row's softmax is its own."""
    tq, h, _ = q.shape
    s = config.block_size
    nq = tq // s
    per_block = h * (s // config.c_q) * (k.shape[0] // config.c_k)
    chunk = max(1, min(nq, max_logits // per_block))
    while nq % chunk:
        chunk -= 1
    if chunk == nq:
        return block_scores(q, k, config, q_start, kv_len)
    starts = q_start + jnp.arange(0, tq, chunk * s)
    chunks = q.reshape(nq // chunk, chunk * s, *q.shape[1:])
    scores = jax.lax.map(lambda args: block_scores(args[0], k, config, args[1], kv_len), (chunks, starts))
    return scores.transpose(1, 0, 2, 3).reshape(h, nq, -1)  # [H, Nq, Nk]
