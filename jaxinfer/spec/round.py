"""A draft-head round as one device program: draft the candidate tree (eagle.draft_tree), pick each
request's verified subtree on the device, build the tree step's inputs there, and verify
(verify.verify_tree). The host hands over the requests and reads back only the emitted tokens, instead
of reading the candidates back, choosing subtrees in numpy and sending a tree step back (two device
calls and a host pass per round, about a quarter of a round's time on a 2-core CPU).

The subtree is the one ``policy.select_tree`` picks on the host: the round's path entropy H* picks a
variant (depth, budget) through the HeteroSpec bins (``RoundPolicy.choose``), the budget is capped by
the nodes the request's pages allow, and the verified nodes are the budget's best candidates by path
score (ties to the earlier), no deeper than the variant's depth, in candidate order (parents first).

Axis letters: B requests, M candidates, N tree nodes (the round's budget; smaller trees are padded).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.engine.batch import sampling_arrays
from jaxinfer.engine.sequence import Sequence
from jaxinfer.layers.attention import TreeMeta
from jaxinfer.layers.kv_pages import PAD_SLOT, KVPages
from jaxinfer.layers.sampler import SamplingArrays
from jaxinfer.spec.batch import TreeInput, draft_rows
from jaxinfer.spec.eagle import DraftInput, draft_tree
from jaxinfer.spec.tree import PAD_TOKEN
from jaxinfer.spec.verify import VerifyResult, verify_tree


@dataclasses.dataclass(frozen=True, order=True)
class RoundShape:
    num_rows: int  # B requests (a bucket)
    num_nodes: int  # N: the largest budget of the round's variants (or what the context allows)
    path_len: int  # D1: the deepest path any variant drafts, plus the root
    kv_tokens: int  # KV slots a request reads: committed + N, bucketed
    top_k: int
    depth: int  # levels drafted
    base_depth: int  # the level whose best path gives the HeteroSpec entropy


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundInput:
    draft: DraftInput  # roots, committed lengths (0: a padding row), slots (padding: out of range), page tables
    node_limit: jax.Array  # [B] int32 nodes the request's pages allow (root included; 0: padding)
    sampling: SamplingArrays  # [B] the requests' parameters, index = the next output position
    want_logprobs: jax.Array  # [] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundResult:
    verify: VerifyResult
    sizes: jax.Array  # [B] int32 nodes verified (root included)
    entropy: jax.Array  # [B] float32 the round's path entropy H*


def build_round_input(seqs: list[Sequence], limits: list[int], num_rows: int, max_pages_per_seq: int,
                      num_slots: int) -> RoundInput:
    if len(limits) != len(seqs):
        raise ValueError(f"{len(limits)} node limits for {len(seqs)} requests")
    node_limit = np.zeros(num_rows, np.int32)
    node_limit[:len(limits)] = limits
    sampling = sampling_arrays(list(seqs) + [None] * (num_rows - len(seqs)))
    return jax.device_put(RoundInput(
        draft=draft_rows(seqs, num_rows, max_pages_per_seq, pad_length=0, pad_slot=num_slots),
        node_limit=node_limit, sampling=sampling,
        want_logprobs=np.array(any(seq.params.logprobs is not None for seq in seqs))))


def select_subtrees(candidates: dict[str, jax.Array], roots: jax.Array, node_limit: jax.Array, *,
                    variants: tuple[tuple[int, int], ...], thresholds: tuple[float, ...], num_nodes: int,
                    path_len: int):
    """Each request's verified subtree from its candidates [B, M]: (tokens, parents, depths [B, N], the
    ancestor-or-self mask [B, N, N], sizes [B]); padding nodes as ``tree.pack`` pads them."""
    scores, depths_c = candidates["scores"], candidates["depths"]
    num_rows, num_cand = scores.shape
    variant = jnp.full((num_rows,), 0, jnp.int32)
    if thresholds:  # bins 0, 1, 2 take variants 1, 2, 3; above the last threshold the default (0)
        bins = jnp.searchsorted(jnp.asarray(thresholds, jnp.float32), candidates["entropy"], side="left")
        variant = jnp.where(bins >= 3, 0, 1 + bins)
    max_depth = jnp.asarray([d for d, _ in variants], jnp.int32)[variant]
    budget = jnp.minimum(jnp.minimum(jnp.asarray([b for _, b in variants], jnp.int32)[variant], node_limit),
                         num_nodes)
    picks = num_nodes - 1
    key = jnp.where(depths_c <= max_depth[:, None], scores, -jnp.inf)
    best, order = jax.lax.top_k(key, picks)  # by score, ties to the earlier candidate
    kept = (jnp.arange(picks)[None] < (budget - 1)[:, None]) & (best > -jnp.inf)
    chosen = jnp.sort(jnp.where(kept, order, num_cand), axis=1)  # candidate order: parents first
    count = kept.sum(axis=1)
    real = jnp.arange(picks)[None] < count[:, None]  # [B, N-1]
    index = jnp.minimum(chosen, num_cand - 1)
    cand_parent = jnp.take_along_axis(candidates["parents"], index, axis=1)
    parent_pos = jax.vmap(jnp.searchsorted)(chosen, cand_parent)  # the parent's place among the chosen
    live = (node_limit > 0)[:, None]
    tokens = jnp.concatenate([jnp.where(live, roots[:, None], PAD_TOKEN),
                              jnp.where(real, jnp.take_along_axis(candidates["tokens"], index, axis=1), PAD_TOKEN)],
                             axis=1)
    parents = jnp.concatenate([jnp.full((num_rows, 1), -1, jnp.int32),
                               jnp.where(real, jnp.where(cand_parent < 0, 0, parent_pos + 1), -1)], axis=1)
    depths = jnp.concatenate([jnp.zeros((num_rows, 1), jnp.int32),
                              jnp.where(real, jnp.take_along_axis(depths_c, index, axis=1), 0)], axis=1)
    nodes = jnp.concatenate([live, real & live], axis=1)  # [B, N]
    mask = jnp.eye(num_nodes, dtype=bool)[None] & nodes[:, :, None]
    up = jnp.where(parents >= 0, parents, jnp.arange(num_nodes)[None])
    for _ in range(path_len - 1):  # every pass adds one more generation of ancestors
        mask = mask | jnp.take_along_axis(mask, up[:, :, None], axis=1)
    return tokens.astype(jnp.int32), parents.astype(jnp.int32), depths, mask, jnp.where(live[:, 0], count + 1, 0)


def tree_input(batch: RoundInput, tokens, parents, depths, mask, sizes, *, kv_tokens: int, page_size: int,
               impl: str, interpret: bool) -> TreeInput:
    """The verification step's inputs (what ``batch.build_tree_input`` builds on the host)."""
    num_rows, num_nodes = tokens.shape
    draft = batch.draft
    node = jnp.arange(num_nodes)[None]
    real = node < sizes[:, None]
    kv_slot = draft.lengths[:, None] + node  # node j writes slot committed + j
    page = jnp.take_along_axis(draft.page_indices, jnp.minimum(kv_slot // page_size, draft.page_indices.shape[1] - 1),
                               axis=1)
    slot_mapping = jnp.where(real, page * page_size + kv_slot % page_size, PAD_SLOT)
    positions = jnp.where(real, draft.lengths[:, None] + depths, 0)
    sampling = jax.tree.map(lambda field: jnp.repeat(field, num_nodes, axis=0), batch.sampling)
    sampling = dataclasses.replace(sampling, index=sampling.index + depths.reshape(-1))
    meta = TreeMeta(slot_mapping=slot_mapping.reshape(-1), kv_lens=draft.lengths, page_indices=draft.page_indices,
                    tree_mask=mask, kv_tokens=kv_tokens, impl=impl, interpret=interpret)
    return TreeInput(tokens=jnp.maximum(tokens, 0).reshape(-1), positions=positions.reshape(-1), meta=meta,
                     node_tokens=tokens, parents=parents, depths=depths, sampling=sampling,
                     want_logprobs=batch.want_logprobs, slots=draft.slots)


def round_step(graphdef, head_graphdef, num_top: int, shape: RoundShape, variants: tuple[tuple[int, int], ...],
               thresholds: tuple[float, ...], impl: str, interpret: bool, state, kv: KVPages, sampler,
               batch: RoundInput):
    """The jitted round: (RoundResult, kv, sampler); state = (model state, head state)."""
    model = nnx.merge(graphdef, state[0])
    head = nnx.merge(head_graphdef, state[1])
    num_layers = model.config.num_layers
    with jax.named_scope("draft"):
        candidates = draft_tree(head, model.embed, kv, sampler.pending, batch.draft, top_k=shape.top_k,
                                depth=shape.depth, base_depth=shape.base_depth, kv_tokens=shape.kv_tokens,
                                num_target_layers=num_layers)
    with jax.named_scope("select"):
        tokens, parents, depths, mask, sizes = select_subtrees(
            candidates, batch.draft.roots, batch.node_limit, variants=variants, thresholds=thresholds,
            num_nodes=shape.num_nodes, path_len=shape.path_len)
        tree = tree_input(batch, tokens, parents, depths, mask, sizes, kv_tokens=shape.kv_tokens,
                          page_size=kv.page_size, impl=impl, interpret=interpret)
    result, kv, sampler = verify_tree(model, head, kv, sampler, tree, num_top=num_top, path_len=shape.path_len)
    return RoundResult(result, sizes, candidates["entropy"]), kv, sampler
