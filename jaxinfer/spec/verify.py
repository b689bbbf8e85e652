"""Tree verification on device: acceptance and the KV commit of the accepted path (pure jax).

Acceptance, for greedy and sampled rows alike: every node u draws y_u from the target's (processed)
distribution at u, exactly as plain decoding would draw the token after u's path (the same key:
the request's seed with the output index of that token folded in). A draft node is accepted when
its token equals its parent's draw and its parent is accepted. The deepest accepted node ends the
path; the tokens emitted are the draws along the path: the accepted drafts, then the draw at the
last node (the bonus token). Since each emitted token is the target's own draw given the exact
preceding tokens, the output has the target's distribution, and with a fixed seed it is the very
token sequence plain decoding produces. (A deterministic draft makes this equal to the
accept-with-probability-p(x) rule of EAGLE; SpecInfer's residual rule is the same algorithm.)

Axis letters: B requests, N tree nodes, D1 = deepest path + 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.layers.attention import write_kv
from jaxinfer.layers.kv_pages import PAD_SLOT, KVPages
from jaxinfer.layers.sampler import logprobs, sample
from jaxinfer.spec.eagle import project_kv


def accept(node_tokens: jax.Array, parents: jax.Array, depths: jax.Array, mask: jax.Array, samples: jax.Array,
           path_len: int) -> tuple[jax.Array, jax.Array]:
    """node_tokens, parents, depths, samples [B, N]; mask [B, N, N] ancestor-or-self.

    Returns path [B, D1] (node index at each depth of the accepted path, entries past it 0) and
    num_accepted [B] (accepted draft tokens; the round emits num_accepted + 1).
    """
    parent_draw = jnp.take_along_axis(samples, jnp.maximum(parents, 0), axis=1)
    matches = (node_tokens == parent_draw) & (parents >= 0)
    matches = matches.at[:, 0].set(True)
    accepted = jnp.all(jnp.where(mask, matches[:, None, :], True), axis=-1)  # every ancestor matches
    accepted &= jnp.diagonal(mask, axis1=1, axis2=2)  # padding nodes are in no tree
    best = jnp.argmax(jnp.where(accepted, depths, -1), axis=1)  # [B] deepest accepted node
    num_accepted = jnp.take_along_axis(depths, best[:, None], axis=1)[:, 0]
    on_path = jnp.take_along_axis(mask, best[:, None, None], axis=1)[:, 0]  # [B, N]
    levels = jnp.arange(path_len)
    at_level = on_path[:, None, :] & (depths[:, None, :] == levels[None, :, None])  # [B, D1, N]
    path = jnp.argmax(at_level, axis=-1).astype(jnp.int32)
    return jnp.where(levels[None] <= num_accepted[:, None], path, 0), num_accepted


def commit_path(kv: KVPages, page_indices: jax.Array, kv_lens: jax.Array, path: jax.Array,
                num_accepted: jax.Array, num_layers: int) -> KVPages:
    """Move the accepted path's K/V (node path[b, j], slot kv_lens[b] + path[b, j]) to slot
    kv_lens[b] + j in the first num_layers layers, so the committed context is contiguous again.
    Slots past the path keep rejected nodes' K/V, beyond the committed length: never read."""
    page_size, num_pages = kv.page_size, kv.num_pages
    levels = jnp.arange(path.shape[1])
    src = kv_lens[:, None] + path
    dst = kv_lens[:, None] + levels[None]
    keep = (levels[None] <= num_accepted[:, None]) & (path != levels[None])

    def physical(slots):
        return jnp.take_along_axis(page_indices, slots // page_size, axis=1), slots % page_size

    src_page, src_offset = physical(src)
    dst_page, dst_offset = physical(dst)
    layer = (jnp.arange(num_layers) * num_pages)[:, None, None]
    src_page, dst_page = src_page[None] + layer, dst_page[None] + layer  # [layers, B, D1]
    dst_page = jnp.where(keep[None], dst_page, kv.k.shape[1])  # out of range: dropped
    src_offset, dst_offset = jnp.broadcast_to(src_offset, src_page.shape), jnp.broadcast_to(dst_offset, src_page.shape)

    def move(pages):
        return pages.at[:, dst_page, dst_offset].set(pages[:, src_page, src_offset], mode="drop")

    return KVPages(k=move(kv.k), v=move(kv.v), num_pages=num_pages)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyResult:
    tokens: jax.Array  # [B, D1] emitted tokens: the draws along the accepted path (valid up to num_accepted)
    num_accepted: jax.Array  # [B] int32
    token_logprobs: jax.Array | None = None  # [B, D1] float32
    top_ids: jax.Array | None = None  # [B, D1, num_top] int32
    top_logprobs: jax.Array | None = None  # [B, D1, num_top] float32


def verify_step(graphdef, head_graphdef, num_top: int, path_len: int, state, kv: KVPages, sampler, batch):
    """The target over every tree node, the draws, acceptance and the KV commit: one jitted step.
    With a draft head (head_graphdef), also the draft KV of the accepted path and the slots' new
    pending features (see jaxinfer.spec.eagle).

    state = (model state, head state or None); sampler: the runner's SamplerState; batch: a
    ``TreeInput``. Returns (VerifyResult, kv, sampler)."""
    model = nnx.merge(graphdef, state[0])
    head = nnx.merge(head_graphdef, state[1]) if head_graphdef is not None else None
    return verify_tree(model, head, kv, sampler, batch, num_top=num_top, path_len=path_len)


def verify_tree(model, head, kv: KVPages, sampler, batch, *, num_top: int, path_len: int):
    """``verify_step`` on merged modules (head None without a draft head)."""
    num_rows, num_nodes = batch.node_tokens.shape
    rows = jnp.arange(num_rows * num_nodes, dtype=jnp.int32)
    feature_layers = head.config.feature_layers if head is not None else ()
    out = model(batch.tokens, batch.positions, kv, batch.meta, rows, feature_layers)
    logits, kv = out[0], out[1]
    with jax.named_scope("accept"):
        draws = sample(logits, batch.sampling).reshape(num_rows, num_nodes)
        path, num_accepted = accept(batch.node_tokens, batch.parents, batch.depths, batch.meta.tree_mask, draws,
                                    path_len)
        flat = (jnp.arange(num_rows)[:, None] * num_nodes + path).reshape(-1)  # [B * D1] rows of the path
        tokens = draws.reshape(-1)[flat]
    if num_nodes > 1:  # one node is the root, already in its slot: no move (XLA CPU copied the whole pool for it)
        with jax.named_scope("commit_kv"):
            kv = commit_path(kv, batch.meta.page_indices, batch.meta.kv_lens, path, num_accepted,
                             model.config.num_layers)
    tokens = tokens.reshape(num_rows, path_len)
    result = VerifyResult(tokens, num_accepted)
    if num_top:
        empty = (jnp.zeros(flat.shape, jnp.float32), jnp.zeros((*flat.shape, num_top), jnp.int32),
                 jnp.zeros((*flat.shape, num_top), jnp.float32))
        lp = jax.lax.cond(batch.want_logprobs, lambda x: logprobs(x[flat], tokens.reshape(-1), num_top),
                          lambda x: empty, logits)
        lp = tuple(a.reshape(num_rows, path_len, *a.shape[1:]) for a in lp)
        result = dataclasses.replace(result, token_logprobs=lp[0], top_ids=lp[1], top_logprobs=lp[2])
    if head is not None:
        with jax.named_scope("draft_kv"):
            features = out[2][flat].reshape(num_rows, path_len, -1)
            kv, sampler = _commit_draft(head, model.embed, kv, sampler, batch, features, tokens,
                                        num_accepted, model.config.num_layers)
    return result, kv, sampler


def _commit_draft(head, embed, kv: KVPages, sampler, batch, features, tokens, num_accepted, num_layers: int):
    """Draft K/V of the accepted path's pairs: position L-1+j holds (feature of position L-1+j, token
    L+j) for j = 0..accepted, with the slot's pending feature at j = 0; the feature of the last
    accepted node (position L+accepted) becomes pending (its token, the bonus, is not yet known)."""
    num_rows, path_len = tokens.shape
    pending = sampler.pending
    slots = jnp.minimum(batch.slots, pending.shape[0] - 1)
    pairs_features = jnp.concatenate([pending[slots][:, None], features[:, :-1]], axis=1)  # [B, D1, F]
    pairs_tokens = jnp.concatenate([batch.node_tokens[:, :1], tokens[:, :-1]], axis=1)
    levels = jnp.arange(path_len)
    positions = batch.meta.kv_lens[:, None] - 1 + levels[None]
    page_size = kv.page_size
    pages = jnp.take_along_axis(batch.meta.page_indices, jnp.maximum(positions, 0) // page_size, axis=1)
    slot_mapping = pages * page_size + jnp.maximum(positions, 0) % page_size + num_layers * kv.num_pages * page_size
    valid = (levels[None] <= num_accepted[:, None]) & (positions >= 0) & (batch.slots[:, None] < pending.shape[0])
    slot_mapping = jnp.where(valid, slot_mapping, PAD_SLOT)
    k, v = project_kv(head, pairs_features.reshape(num_rows * path_len, -1), jnp.maximum(pairs_tokens, 0).reshape(-1),
                      jnp.maximum(positions, 0).reshape(-1), embed)
    kv = KVPages(k=write_kv(kv.k, k, slot_mapping.reshape(-1)), v=write_kv(kv.v, v, slot_mapping.reshape(-1)),
                 num_pages=kv.num_pages)
    last = jnp.take_along_axis(features, num_accepted[:, None, None], axis=1)[:, 0]
    pending = pending.at[batch.slots].set(last, mode="drop")
    return kv, dataclasses.replace(sampler, pending=pending)
