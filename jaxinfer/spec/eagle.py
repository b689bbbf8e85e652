"""EAGLE-3 drafting on device: the draft layer's KV kept in step with the target, and the dynamic
draft tree (EAGLE-2 expansion) with HeteroSpec's path entropy.

The draft head's KV is one more layer of the target's paged pool (index ``num_layers``), addressed
through the same block tables, so prefix caching, preemption and page accounting cover it.
Pairing (EAGLE): draft position p holds (target feature of token p, embedding of token p+1).

- ``catch_up``: after any target step, token i at position p pairs the feature of position p-1
  (the previous token of the step, or the slot's pending feature from the previous step) with its
  own embedding and writes the draft K/V of position p-1. K/V depend only on these inputs, so no
  attention is needed. The feature of each request's last token stays pending for the next step.
- ``draft_tree``: from the pending feature and the root (the last sampled token, position L), the
  draft runs at L-1 and then expands level by level: each level expands the ``top_k`` frontier
  nodes with the best path score V (sum of draft log-probabilities) into their ``top_k`` children.
  Expansion K/V stay in registers; nothing is written. It returns every candidate with its score,
  parent, depth, and the HeteroSpec entropy H* of the round (cumulative top-K entropy of the best
  path at the base depth); the host picks the verified subtree.

Axis letters: B requests, S slots, T tokens, E hidden, F = 3E fused features, K KV heads, D head
dim, C context slots read, M candidates, Vd draft vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.engine.batch import CatchUp
from jaxinfer.layers.attention import write_kv
from jaxinfer.layers.kv_pages import KVPages


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftInput:
    roots: jax.Array  # [B] int32 last sampled token of each request
    lengths: jax.Array  # [B] int32 committed tokens L (the root is at position L)
    slots: jax.Array  # [B] int32 request slot (pending feature row)
    page_indices: jax.Array  # [B, Pmax] int32


def project_kv(head, features: jax.Array, tokens: jax.Array, positions: jax.Array, embed):
    """Draft K/V [T, K, D] of pairs (features [T, F], token ids [T]) at positions [T]; ``embed`` maps
    token ids to the target's float32 embeddings (``LlamaForCausalLM.embed``)."""
    _, k, v = head.project(head.fuse(features), embed(tokens), positions)
    return k, v


def draft_layer_offset(kv: KVPages, num_target_layers: int) -> int:
    return num_target_layers * kv.num_pages


def catch_up(head, embed, kv: KVPages, pending: jax.Array, features: jax.Array, tokens: jax.Array,
             pairs: CatchUp, num_target_layers: int) -> tuple[KVPages, jax.Array]:
    """Write the draft K/V of one target step's tokens (shifted pairs); returns (kv, pending [S, F])."""
    previous = jnp.concatenate([features[:1], features[:-1]], axis=0)
    previous = jnp.where(pairs.from_pending[:, None], pending[jnp.minimum(pairs.slots, pending.shape[0] - 1)],
                         previous)
    k, v = project_kv(head, previous, tokens, pairs.positions, embed)
    slots = pairs.slot_mapping + draft_layer_offset(kv, num_target_layers) * kv.page_size
    kv = KVPages(k=write_kv(kv.k, k, slots), v=write_kv(kv.v, v, slots), num_pages=kv.num_pages)
    pending = pending.at[jnp.where(pairs.is_last, pairs.slots, pending.shape[0])].set(features, mode="drop")
    return kv, pending


def _topk_entropy(top_logprobs: jax.Array) -> jax.Array:
    """Entropy of the top-K probabilities renormalized ([..., K] log-probs -> [...])."""
    p = jax.nn.softmax(top_logprobs, axis=-1)
    return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)


def draft_tree(head, embed, kv: KVPages, pending: jax.Array, batch: DraftInput, *, top_k: int,
               depth: int, base_depth: int, kv_tokens: int, num_target_layers: int) -> dict[str, jax.Array]:
    """EAGLE-2 expansion to ``depth`` levels for B requests.

    Returns (all [B, M], M = k + (depth - 1) k^2, level by level, so parents come first): tokens
    (target ids), parents (candidate index, -1 = the root), scores V, depths; and entropy [B] (H* at
    ``base_depth``)."""
    num_rows, k = batch.roots.shape[0], top_k
    page_size = kv.page_size
    offset = draft_layer_offset(kv, num_target_layers)
    pages = batch.page_indices[:, :-(-kv_tokens // page_size)] + offset  # [B, C / L]
    kv_heads, head_dim = kv.k.shape[0], kv.k.shape[3]

    def gather(pool):  # [K, B, C/L, L, D] -> [B, C, K, D]
        return pool[:, pages].reshape(kv_heads, num_rows, -1, head_dim)[:, :, :kv_tokens].transpose(1, 2, 0, 3)

    ctx_k, ctx_v = gather(kv.k), gather(kv.v)
    ctx_valid = jnp.arange(kv_tokens)[None] < (batch.lengths - 1)[:, None]  # [B, C]: positions < L-1
    num_temp = 1 + (depth - 1) * k  # the root step, then the frontier of each expanded level
    temp_k = jnp.zeros((num_rows, num_temp, kv_heads, head_dim), jnp.float32)
    temp_v = jnp.zeros_like(temp_k)
    d2t = head.d2t[...]

    def step(hidden, tokens, positions, temp_visible):
        """One draft call per request: hidden [B, T, E], tokens [B, T] target ids, positions [B, T],
        temp_visible [B, T, num_temp] -> out [B, T, E], k, v [B, T, K, D]."""
        num_q = tokens.shape[1]
        own = jnp.broadcast_to(jnp.eye(num_q, dtype=bool), (num_rows, num_q, num_q))
        mask = jnp.concatenate([jnp.broadcast_to(ctx_valid[:, None], (num_rows, num_q, kv_tokens)), temp_visible,
                                own], axis=-1)
        keys = jnp.concatenate([ctx_k, temp_k], axis=1)
        values = jnp.concatenate([ctx_v, temp_v], axis=1)
        embeds = embed(tokens)
        return jax.vmap(head)(hidden, embeds, positions, keys, values, mask)

    def expand(out):
        """out [B, T, E] -> top-k draft log-probs [B, T, k], their target ids, and the top-K entropy [B, T]."""
        logp = jax.nn.log_softmax(head.logits(out), axis=-1)
        values, ids = jax.lax.top_k(logp, k)
        return values, d2t[ids], _topk_entropy(values)

    # the root step: (pending feature of L-1, root token) at L-1
    hidden = head.fuse(pending[batch.slots])[:, None]  # [B, 1, E]
    out, k_new, v_new = step(hidden, batch.roots[:, None], (batch.lengths - 1)[:, None],
                             jnp.zeros((num_rows, 1, num_temp), bool))
    temp_k, temp_v = temp_k.at[:, 0].set(k_new[:, 0]), temp_v.at[:, 0].set(v_new[:, 0])
    logp, ids, entropy = expand(out)  # [B, 1, k]
    scores, tokens = [logp[:, 0]], [ids[:, 0]]
    parents = [jnp.full((num_rows, k), -1, jnp.int32)]
    depths = [jnp.ones((num_rows, k), jnp.int32)]
    cum_entropy = jnp.broadcast_to(entropy, (num_rows, k))
    best_entropy = cum_entropy[:, 0]
    frontier = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (num_rows, k))  # candidate index
    f_score, f_token, f_entropy = logp[:, 0], ids[:, 0], cum_entropy
    f_hidden = jnp.broadcast_to(out, (num_rows, k, out.shape[-1]))
    f_visible = jnp.zeros((num_rows, k, num_temp), bool).at[:, :, 0].set(True)
    rows = jnp.arange(num_rows)[:, None]
    for level in range(2, depth + 1):
        first = 1 + (level - 2) * k  # temp entries of this level's expansion calls
        positions = jnp.broadcast_to((batch.lengths + level - 2)[:, None], (num_rows, k))
        out, k_new, v_new = step(f_hidden, f_token, positions, f_visible)
        temp_k = temp_k.at[:, first:first + k].set(k_new)
        temp_v = temp_v.at[:, first:first + k].set(v_new)
        logp, ids, entropy = expand(out)  # [B, k, k]
        cand_score = (f_score[:, :, None] + logp).reshape(num_rows, k * k)
        cand_entropy = jnp.broadcast_to((f_entropy + entropy)[:, :, None], (num_rows, k, k)).reshape(num_rows, -1)
        base = k + (level - 2) * k * k
        scores.append(cand_score)
        tokens.append(ids.reshape(num_rows, -1))
        parents.append(jnp.broadcast_to(frontier[:, :, None], (num_rows, k, k)).reshape(num_rows, -1))
        depths.append(jnp.full((num_rows, k * k), level, jnp.int32))
        if level == base_depth:
            best_entropy = jnp.take_along_axis(cand_entropy, jnp.argmax(cand_score, axis=1)[:, None], axis=1)[:, 0]
        _, chosen = jax.lax.top_k(cand_score, k)  # [B, k] the next frontier
        parent_slot = chosen // k
        frontier = base + chosen
        f_score = jnp.take_along_axis(cand_score, chosen, axis=1)
        f_token = jnp.take_along_axis(tokens[-1], chosen, axis=1)
        f_entropy = jnp.take_along_axis(cand_entropy, chosen, axis=1)
        f_hidden = out[rows, parent_slot]
        own_entry = jax.nn.one_hot(first + parent_slot, num_temp, dtype=bool)
        f_visible = f_visible[rows, parent_slot] | own_entry
    return dict(tokens=jnp.concatenate(tokens, axis=1), parents=jnp.concatenate(parents, axis=1),
                scores=jnp.concatenate(scores, axis=1), depths=jnp.concatenate(depths, axis=1), entropy=best_entropy)


def draft_step(head_graphdef, model_graphdef, top_k: int, depth: int, base_depth: int, kv_tokens: int, state,
               kv: KVPages, sampler, batch: DraftInput):
    """The jitted drafting function (see draft_tree); state = (model state, head state); it reads the
    sampler state's pending features."""
    model = nnx.merge(model_graphdef, state[0])
    head = nnx.merge(head_graphdef, state[1])
    with jax.named_scope("draft"):
        return draft_tree(head, model.embed, kv, sampler.pending, batch, top_k=top_k, depth=depth,
                          base_depth=base_depth, kv_tokens=kv_tokens, num_target_layers=model.config.num_layers)
