"""Tree attention: the verification step of speculative decoding over paged KV.

Axis letters: B requests, N tree nodes per request, H query heads, K KV heads, G = H / K, D head_dim,
P pages in the pool, L page size, S KV slots, W 32-bit words of a node's ancestor bitmask.

Contract shared by the kernel and the reference:
- ``q`` [B, N, H, D]: the tree nodes' queries (rotary already applied).
- ``k_pages``, ``v_pages`` [K, P, L, D]; request b's slot s lives in page ``page_indices[b, s // L]``
  at offset s % L. The nodes' K/V are already written: node j of request b sits at slot
  ``kv_lens[b] + j``, so the pages cover kv_lens[b] + N slots.
- ``kv_lens`` [B]: the committed length of request b (the tree excluded).
- ``tree_mask`` [B, N, N] bool: [b, i, j] iff node j is node i or one of its ancestors.
- Node i of request b attends to every committed slot s < kv_lens[b] and to the tree slots
  kv_lens[b] + j with tree_mask[b, i, j]. Query head h reads KV head h // G.
- A node that sees no slot at all (padding requests: kv_lens 0, an all-False mask row) outputs zeros.
- The output is [B, N, H, D] float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import paged_attention_mgpu as mgpu
from pallas_kernels._backend import (
    online_softmax_step,
    paged_kv_loader,
    resolve_interpret,
    run_kernel,
    use_mosaic_gpu,
)
from pallas_kernels._mgpu import load_rows

MASK_VALUE = -1e30
_WORD_BITS = 32  # ancestor bits per int32 word of the kernel's packed tree mask


def _check_shapes(q, k_pages, v_pages, kv_lens, page_indices, tree_mask):
    if q.ndim != 4 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected q [B, N, H, D] and pages [K, P, L, D], got {q.shape=}, {k_pages.shape=}, "
                         f"{v_pages.shape=}")
    if q.shape[3] != k_pages.shape[3] or q.shape[2] % k_pages.shape[0]:
        raise ValueError(f"head_dim or GQA grouping mismatch: {q.shape=}, {k_pages.shape=}")
    num_reqs, num_nodes = q.shape[:2]
    if kv_lens.shape != (num_reqs,) or page_indices.ndim != 2 or page_indices.shape[0] != num_reqs \
            or tree_mask.shape != (num_reqs, num_nodes, num_nodes):
        raise ValueError(f"expected kv_lens [B], page_indices [B, Pmax], tree_mask [B, N, N] for {q.shape=}, "
                         f"got {kv_lens.shape=}, {page_indices.shape=}, {tree_mask.shape=}")
    for name, array in (("kv_lens", kv_lens), ("page_indices", page_indices)):
        if array.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {array.dtype}")
    if tree_mask.dtype != jnp.bool_:
        raise ValueError(f"tree_mask must be bool, got {tree_mask.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating) or k_pages.dtype != v_pages.dtype \
            or not jnp.issubdtype(k_pages.dtype, jnp.floating):
        raise ValueError(f"expected floating q and pages of one floating dtype, got {q.dtype=}, "
                         f"{k_pages.dtype=}, {v_pages.dtype=}")


def _tree_attention_kernel(
    kv_lens_ref,  # [B] committed slots of each request
    num_kv_ref,  # [B] slots to visit: kv_lens + 1 + the last node any row sees (+ 0 if none)
    page_indices_ref,  # [B * pages_per_req]
    q_ref,  # [R, D] rows g * N + i: head g of the KV head, node i (rows past G * N are padding)
    tree_bits_ref,  # [W, R, 1] int32: bit j of word w of row g * N + i is tree_mask[b, i, 32 * w + j]
    k_pages_ref,  # [P, L, D] this KV head's pages; Mosaic: [K, P, L, D] left in HBM
    v_pages_ref,  # same as k_pages_ref
    o_ref,  # [R, D] float32
    *scratch,  # Mosaic only: k_buf, v_buf [2, pages_per_block * L, D] (double buffer), sems DMA[2, 2]
    pages_per_block: int,
    pages_per_req: int,
    sm_scale: float,
):
    """One program: the G * N node rows of one (request, KV head), online softmax over its pages. The
    committed slots and the tree slots share one page loop; only the visibility test tells them apart."""
    req, kv_head = pl.program_id(0), pl.program_id(1)
    kv_len, num_kv = kv_lens_ref[req], num_kv_ref[req]
    rows, head_dim = q_ref.shape
    page_size = v_pages_ref.shape[-2]
    kv_block = pages_per_block * page_size
    num_steps = lax.div(num_kv + kv_block - 1, kv_block)

    def first_page(step):
        return req * pages_per_req + step * pages_per_block

    load_kv = paged_kv_loader(scratch, k_pages_ref, v_pages_ref, page_indices_ref, kv_head, first_page,
                              pages_per_block, num_steps)

    q = q_ref[...]
    tree_bits = [tree_bits_ref[w] for w in range(tree_bits_ref.shape[0])]  # W x [R, 1]
    slot_in_block = lax.broadcasted_iota(jnp.int32, (rows, kv_block), 1)  # [R, L']

    def body(step, carry):
        keys, values = load_kv(step)  # [L', D] each, L' = pages_per_block * L
        scores = lax.dot_general(q, keys.astype(q.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * sm_scale  # [R, L']
        slot = step * kv_block + slot_in_block
        visible = slot < kv_len  # committed
        node = slot - kv_len  # tree node held by the slot (negative: committed)
        for w, bits in enumerate(tree_bits):
            bit = node - w * _WORD_BITS
            in_word = (bit >= 0) & (bit < _WORD_BITS)
            # An arithmetic shift is fine: only bit 0 of the result is kept.
            ancestor = ((bits >> jnp.minimum(jnp.maximum(bit, 0), _WORD_BITS - 1)) & 1) != 0
            visible = visible | (in_word & ancestor)
        return online_softmax_step(carry, scores, visible, values, MASK_VALUE)

    init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    _, l_final, acc = lax.fori_loop(0, num_steps, body, init)
    o_ref[...] = acc / jnp.where(l_final == 0.0, 1.0, l_final)


def tree_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                   page_indices: jax.Array, tree_mask: jax.Array, *, sm_scale: float | None = None,
                   pages_per_block: int | None = None,
                   interpret: bool | pltpu.InterpretParams | None = None,
                   gpu_body: str | None = None) -> jax.Array:
    """Pallas tree attention (module docstring gives the contract). Returns [B, N, H, D] float32.

    q [B, N, H, D] float; k_pages, v_pages [K, P, L, D] of one float dtype; kv_lens [B] and
    page_indices [B, Pmax] int32 (entries clamped into [0, P)); tree_mask [B, N, N] bool.

    Layout: the grid is (B, K); each program gathers its KV head's G query heads x N nodes into one
    [R, D] tile (R = G * N padded to a power of two >= 16) and loops over ``pages_per_block`` pages per
    step (default: at least 64 slots), as many steps as the request's committed slots plus its tree
    need. The tree mask goes in as per-row ancestor bitmasks (ceil(N / 32) int32 words, padded to a
    power of two), so any N works and a tree block that straddles pages needs no special case.

    ``interpret``: None resolves via ``_backend.resolve_interpret``; True runs the Triton-style body
    in the generic interpreter; a ``pltpu.InterpretParams`` runs the Mosaic body (DMAs, SMEM) in the
    TPU interpreter; a ``plgpu.InterpretGPUParams`` runs the Mosaic GPU body in its interpreter (jax >=
    0.11); False compiles, picking the Mosaic body when lowered for TPU and on a GPU the Triton body, or
    the Mosaic GPU body (``paged_attention_mgpu``) where ``gpu_body`` (default JAXINFER_GPU_BODY) is
    "mosaic" and it serves the shapes. Compiled, head_dim and pages_per_block * L must be powers of two
    >= 16 (Triton dots).
    """
    _check_shapes(q, k_pages, v_pages, kv_lens, page_indices, tree_mask)
    page_size = k_pages.shape[2]
    if pages_per_block is None:
        pages_per_block = 1 << (max(1, 64 // page_size).bit_length() - 1)
    if pages_per_block < 1 or pages_per_block & (pages_per_block - 1):
        raise ValueError(f"pages_per_block must be a positive power of two, got {pages_per_block}")
    interpret = resolve_interpret(interpret)
    kv_block = pages_per_block * page_size
    rows = q.shape[1] * q.shape[2] // k_pages.shape[0]  # G * N
    supported = mgpu.supported(q.dtype, k_pages.dtype, head_dim=q.shape[3], page_size=page_size,
                               pages_per_block=pages_per_block, rows=rows)
    mosaic_gpu = use_mosaic_gpu(
        interpret, gpu_body, supported,
        f"16-bit q and pages of one dtype, head_dim and pages_per_block * page_size multiples of {mgpu.TILE}, "
        f"page_size a multiple of 8 and G * N <= {mgpu.MAX_ROWS}, got {q.shape=}, {k_pages.shape=}, {q.dtype=}, "
        f"{k_pages.dtype=}, {pages_per_block=}")
    if interpret is False and not all(n >= 16 and n & (n - 1) == 0 for n in (q.shape[3], kv_block)):
        raise ValueError(f"compiled kernels need head_dim and pages_per_block * page_size to be powers of two "
                         f">= 16 (Triton dots), got {q.shape=}, {k_pages.shape=}, {pages_per_block=}")
    scale = q.shape[3] ** -0.5 if sm_scale is None else float(sm_scale)
    return _tree_attention(q, k_pages, v_pages, kv_lens, page_indices, tree_mask, sm_scale=scale,
                           pages_per_block=pages_per_block, interpret=interpret, mosaic_gpu=mosaic_gpu)


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_block", "interpret", "mosaic_gpu"))
def _tree_attention(q, k_pages, v_pages, kv_lens, page_indices, tree_mask, *, sm_scale, pages_per_block,
                    interpret, mosaic_gpu):
    num_reqs, num_nodes, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    max_pages = page_indices.shape[1]
    group = num_heads // num_kv_heads
    rows = mgpu.tile_rows(group * num_nodes) if mosaic_gpu else max(16, _next_power_of_two(group * num_nodes))
    num_words = _next_power_of_two(-(-num_nodes // _WORD_BITS))

    # Queries in the kernel's [R, D] layout: row g * N + i holds head g of the KV head, node i.
    q_rows = q.reshape(num_reqs, num_nodes, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q_rows = q_rows.reshape(num_reqs, num_kv_heads, group * num_nodes, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - group * num_nodes), (0, 0)))  # [B, K, R, D]

    # Ancestor bitmasks per row (the same for every head of the group); padding rows see no node.
    mask = jnp.pad(tree_mask, ((0, 0), (0, 0), (0, num_words * _WORD_BITS - num_nodes)))
    mask = mask.reshape(num_reqs, num_nodes, num_words, _WORD_BITS).astype(jnp.uint32)
    words = jnp.sum(mask << jnp.arange(_WORD_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)  # [B, N, W]
    words = lax.bitcast_convert_type(words, jnp.int32)
    words = jnp.pad(jnp.tile(words, (1, group, 1)), ((0, 0), (0, rows - group * num_nodes), (0, 0)))
    tree_bits = words.transpose(0, 2, 1)[..., None]  # [B, W, R, 1]

    # Slots to visit: the committed ones and the tree up to the last node any row sees (none for
    # padding requests, whose page-table rows are never read).
    seen = jnp.any(tree_mask, axis=1)  # [B, N]
    tree_extent = jnp.max(jnp.where(seen, jnp.arange(1, num_nodes + 1, dtype=jnp.int32), 0), axis=1)
    num_kv = (kv_lens + tree_extent).astype(jnp.int32)  # [B]

    # Page table flattened (SMEM pads 2-D arrays to 128 lanes) and padded to whole KV steps.
    padded_pages = -(-max_pages // pages_per_block) * pages_per_block
    flat_pages = jnp.pad(jnp.clip(page_indices, 0, num_pages - 1), ((0, 0), (0, padded_pages - max_pages)))
    scalars = (kv_lens, num_kv, flat_pages.reshape(-1))

    kernel = functools.partial(_tree_attention_kernel, pages_per_block=pages_per_block, pages_per_req=padded_pages,
                               sm_scale=sm_scale)
    out_shape = jax.ShapeDtypeStruct(q_rows.shape, jnp.float32)
    name = f"tree_attention_n{num_nodes}_ppb{pages_per_block}"
    grid = (num_reqs, num_kv_heads)

    def mosaic_call(interpret_params):
        row_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, k, *_: (b, k, 0, 0))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),  # kv_lens, num_kv and the page table -> SMEM
            grid=grid,
            in_specs=[
                row_spec,  # q rows
                pl.BlockSpec((None, num_words, rows, 1), lambda b, k, *_: (b, 0, 0, 0)),  # tree bits
                pl.BlockSpec(memory_space=pl.ANY),  # k pages stay in HBM; pages are DMA'd per step
                pl.BlockSpec(memory_space=pl.ANY),  # v pages
            ],
            out_specs=row_spec,
            scratch_shapes=[pltpu.VMEM((2, pages_per_block * page_size, head_dim), k_pages.dtype),
                            pltpu.VMEM((2, pages_per_block * page_size, head_dim), v_pages.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))],  # [k or v, buffer slot]
        )
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec, name=name, interpret=interpret_params,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        )(*scalars, q_rows, tree_bits, k_pages, v_pages)

    def triton_call(interpret_flag):
        row_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, k: (b, k, 0, 0))
        pool_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, k: (k, 0, 0, 0))
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=grid, name=name, interpret=interpret_flag,
            in_specs=[pl.no_block_spec] * len(scalars)  # kv_lens, num_kv and the page table, read as scalars
            + [row_spec,  # q rows
               pl.BlockSpec((None, num_words, rows, 1), lambda b, k: (b, 0, 0, 0)),  # tree bits
               pool_spec, pool_spec],  # k and v pages of this KV head
            out_specs=row_spec,
            compiler_params=None if interpret_flag else pltriton.CompilerParams(num_warps=4, num_stages=2),
        )(*scalars, q_rows, tree_bits, k_pages, v_pages)

    def mosaic_gpu_call(interpret_params):
        ancestry = mgpu.Visibility(inputs=(kv_lens, tree_bits[..., 0]), rule=_tree_rule)
        return mgpu.paged_attention_mgpu(q_rows, k_pages, v_pages, scalars[2], num_kv, ancestry,
                                         pages_per_block=pages_per_block, pages_per_item=padded_pages,
                                         sm_scale=sm_scale, out_dtype=jnp.float32, interpret=interpret_params)

    out = run_kernel(mosaic_call, triton_call, interpret, mosaic_gpu_call if mosaic_gpu else None)  # [B, K, R, D]
    out = out[:, :, :group * num_nodes].reshape(num_reqs, num_kv_heads, group, num_nodes, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(num_reqs, num_nodes, num_heads, head_dim)


def _tree_rule(refs, req, slots, rows):
    """A row sees the committed slots and its node's ancestors' slots (the Mosaic GPU body's visibility
    rule): ``refs`` = kv_lens [B] and the rows' ancestor words [B, W, R] in GMEM."""
    del rows  # each row's words are loaded in the accumulator's row layout instead
    kv_lens_ref, bits_ref = refs
    kv_len = kv_lens_ref[req]
    node = slots - kv_len  # tree node held by the slot (negative: committed)
    visible = node < 0
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    for w in range(bits_ref.shape[1]):
        bits = lax.broadcast_in_dim(load_rows(bits_ref.at[req, w], row_layout),
                                    slots.shape, [0])
        bit = node - w * _WORD_BITS
        in_word = (bit >= 0) & (bit < _WORD_BITS)
        ancestor = ((bits >> jnp.minimum(jnp.maximum(bit, 0), _WORD_BITS - 1)) & 1) != 0
        visible = visible | (in_word & ancestor)
    return visible


def _request_attention(q, kv_len, pages, tree_pages, tree_offsets, tree_mask, k_pages, v_pages, scale):
    """One request: q [K, G*N, D] (row g * N + i), kv_len [], pages [Pc] of the committed slots, the
    nodes' pages and offsets [N], tree_mask [N, N] -> [K, G*N, D] float32."""
    num_kv_heads, rows, head_dim = q.shape
    group = rows // tree_mask.shape[0]

    def scores(keys):  # [K, M, D] -> [K, G*N, M]
        return jnp.einsum("kqd,ksd->kqs", q, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale

    # Committed slots: whole pages (L * D contiguous values, several times faster on CPU than slot by
    # slot), masked by position only.
    keys_c = jnp.take(k_pages, pages, axis=1).reshape(num_kv_heads, -1, head_dim)  # [K, S, D]
    values_c = jnp.take(v_pages, pages, axis=1).reshape(num_kv_heads, -1, head_dim)
    committed = jnp.arange(keys_c.shape[1]) < kv_len  # [S]
    scores_c = jnp.where(committed, scores(keys_c), MASK_VALUE)  # [K, G*N, S]
    # Tree slots: the N node slots, masked by ancestry (the same for every head of the group).
    keys_t, values_t = k_pages[:, tree_pages, tree_offsets], v_pages[:, tree_pages, tree_offsets]  # [K, N, D]
    scores_t = jnp.where(jnp.tile(tree_mask, (group, 1)), scores(keys_t), MASK_VALUE)  # [K, G*N, N]

    m = jnp.maximum(jnp.max(scores_c, axis=-1, keepdims=True), jnp.max(scores_t, axis=-1, keepdims=True))
    # Masked scores underflow to probability 0 unless the row sees nothing (m still MASK_VALUE);
    # those rows are zeroed at the end instead of masking the probabilities a second time.
    probs_c, probs_t = jnp.exp(scores_c - m), jnp.exp(scores_t - m)
    total = jnp.sum(probs_c, axis=-1, keepdims=True) + jnp.sum(probs_t, axis=-1, keepdims=True)
    out = (jnp.einsum("kqs,ksd->kqd", probs_c.astype(values_c.dtype), values_c, preferred_element_type=jnp.float32)
           + jnp.einsum("kqs,ksd->kqd", probs_t.astype(values_t.dtype), values_t,
                        preferred_element_type=jnp.float32))
    return jnp.where(m > MASK_VALUE / 2, out / total, 0.0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_kv_tokens"))
def tree_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                             page_indices: jax.Array, tree_mask: jax.Array, *, sm_scale: float | None = None,
                             max_kv_tokens: int | None = None) -> jax.Array:
    """Pure-jnp tree attention (module docstring gives the contract). Returns [B, N, H, D] float32.

    Requests run one at a time through ``lax.map`` (about 3x faster on CPU than one batched gather
    and matmul over all requests: each request's gathered pages stay in cache). Within a request,
    committed slots and tree slots are scored separately and share one softmax. ``max_kv_tokens``,
    a static bound on kv_lens[b] + N for every request, sizes the committed gather (default: the
    whole page table, Pmax * L slots); it never changes the result as long as the bound holds.
    """
    _check_shapes(q, k_pages, v_pages, kv_lens, page_indices, tree_mask)
    num_reqs, num_nodes, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    max_pages = page_indices.shape[1]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(num_reqs, num_nodes, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(num_reqs, num_kv_heads, group * num_nodes, head_dim)  # [B, K, G*N, D]
    committed_pages = max_pages if max_kv_tokens is None else \
        min(max_pages, max(1, -(-(max_kv_tokens - num_nodes) // page_size)))
    pages = jnp.clip(page_indices[:, :committed_pages], 0, num_pages - 1)  # [B, Pc]
    slots = kv_lens[:, None] + jnp.arange(num_nodes, dtype=jnp.int32)  # [B, N] the nodes' slots
    tree_pages = jnp.take_along_axis(page_indices, jnp.clip(slots // page_size, 0, max_pages - 1), axis=1)
    tree_pages = jnp.clip(tree_pages, 0, num_pages - 1)  # [B, N]
    out = lax.map(lambda args: _request_attention(*args, k_pages, v_pages, scale),
                  (qg, kv_lens, pages, tree_pages, slots % page_size, tree_mask))  # [B, K, G*N, D]
    out = out.reshape(num_reqs, num_kv_heads, group, num_nodes, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(num_reqs, num_nodes, num_heads, head_dim)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
