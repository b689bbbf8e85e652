"""A verification step as one pytree of padded arrays (host numpy, one device_put).

Token layout: B requests x N nodes, flat, request-major. Node j of request b is at position
``committed_b + depth(j)`` and writes its K/V to slot ``committed_b + j`` of the request's pages
(pages the engine allocated for the round); padding nodes write nowhere.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinfer.engine.batch import sampling_arrays
from jaxinfer.engine.sequence import Sequence
from jaxinfer.layers.attention import TreeMeta
from jaxinfer.layers.kv_pages import PAD_SLOT
from jaxinfer.layers.sampler import SamplingArrays
from jaxinfer.spec.eagle import DraftInput
from jaxinfer.spec.tree import PackedTrees


@dataclasses.dataclass(frozen=True, order=True)
class TreeShape:
    num_rows: int  # B requests (a bucket)
    num_nodes: int  # N nodes per request (a verify budget)
    path_len: int  # D1: the deepest path any variant drafts, plus the root
    kv_tokens: int  # KV slots a request reads: committed + N, bucketed


@dataclasses.dataclass(frozen=True, order=True)
class DraftShape:
    num_rows: int  # B requests (a bucket)
    kv_tokens: int  # committed draft KV slots read, bucketed
    top_k: int
    depth: int  # levels drafted
    base_depth: int  # the level whose best path gives the HeteroSpec entropy


def draft_rows(seqs: list[Sequence], num_rows: int, max_pages_per_seq: int, *, pad_length: int = 1,
               pad_slot: int = 0) -> DraftInput:
    """Each request's root token, committed length, slot and page table as host arrays, one row per
    request; padding rows take ``pad_length`` and ``pad_slot``."""
    roots = np.zeros(num_rows, np.int32)
    lengths = np.full(num_rows, pad_length, np.int32)
    slots = np.full(num_rows, pad_slot, np.int32)
    page_indices = np.zeros((num_rows, max_pages_per_seq), np.int32)
    for row, seq in enumerate(seqs):
        roots[row], lengths[row], slots[row] = seq.token(seq.num_computed), seq.num_computed, seq.slot
        page_indices[row, :len(seq.pages)] = seq.pages
    return DraftInput(roots=roots, lengths=lengths, slots=slots, page_indices=page_indices)


def build_draft_input(seqs: list[Sequence], num_rows: int, max_pages_per_seq: int) -> DraftInput:
    return jax.device_put(draft_rows(seqs, num_rows, max_pages_per_seq))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TreeInput:
    tokens: jax.Array  # [B * N] int32 node tokens (padding: 0)
    positions: jax.Array  # [B * N] int32
    meta: TreeMeta
    node_tokens: jax.Array  # [B, N] int32 (padding: PAD_TOKEN, never accepted)
    parents: jax.Array  # [B, N] int32
    depths: jax.Array  # [B, N] int32
    sampling: SamplingArrays  # [B * N] rows: the request's parameters, index = output position
    want_logprobs: jax.Array  # [] bool
    slots: jax.Array  # [B] int32 request slot (padding: out of range)


def build_tree_input(seqs: list[Sequence], trees: PackedTrees, shape: TreeShape, page_size: int,
                     max_pages_per_seq: int, num_slots: int, *, impl: str, interpret: bool) -> TreeInput:
    num_rows, num_nodes = shape.num_rows, shape.num_nodes
    request_slots = np.full(num_rows, num_slots, np.int32)
    request_slots[:len(seqs)] = [seq.slot for seq in seqs]
    committed = np.zeros(num_rows, np.int32)
    page_indices = np.zeros((num_rows, max_pages_per_seq), np.int32)
    slot_mapping = np.full((num_rows, num_nodes), PAD_SLOT, np.int32)
    positions = np.zeros((num_rows, num_nodes), np.int32)
    for row, seq in enumerate(seqs):
        length, size = seq.num_computed, int(trees.sizes[row])
        committed[row] = length
        pages = np.asarray(seq.pages, np.int32)
        page_indices[row, :len(pages)] = pages
        kv_slots = length + np.arange(size)
        slot_mapping[row, :size] = pages[kv_slots // page_size] * page_size + kv_slots % page_size
        positions[row, :size] = length + trees.depths[row, :size]
    rows = [seq for seq in seqs for _ in range(num_nodes)] + [None] * ((num_rows - len(seqs)) * num_nodes)
    sampling = sampling_arrays(rows)
    sampling = dataclasses.replace(sampling, index=sampling.index + trees.depths.reshape(-1))
    meta = TreeMeta(slot_mapping=slot_mapping.reshape(-1), kv_lens=committed, page_indices=page_indices,
                    tree_mask=trees.mask, kv_tokens=shape.kv_tokens, impl=impl, interpret=interpret)
    want_logprobs = np.array(any(seq.params.logprobs is not None for seq in seqs))
    return jax.device_put(TreeInput(
        tokens=np.maximum(trees.tokens, 0).reshape(-1), positions=positions.reshape(-1), meta=meta,
        node_tokens=trees.tokens, parents=trees.parents, depths=trees.depths, sampling=sampling,
        want_logprobs=want_logprobs, slots=request_slots))
