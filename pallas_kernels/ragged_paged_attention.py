"""Ragged paged attention: causal GQA attention of a flat batch of query tokens over paged KV.

Axis letters: T query tokens (all sequences, concatenated), B sequences, H query heads, K KV heads,
G = H / K, D head_dim, P pages in the pool, L page size, S KV slots.

Contract shared by the kernel and the reference:
- ``q`` [T, H, D]; sequence b < num_seqs owns query rows ``cu_q_lens[b]:cu_q_lens[b+1]``.
- ``k_pages``, ``v_pages`` [K, P, L, D]; sequence b's KV slots 0..kv_lens[b]-1 live in pages
  ``page_indices[b, 0], page_indices[b, 1], ...`` (slot s in page s // L at offset s % L). The new
  tokens' K/V are already written, so kv_lens counts them.
- Query row i of sequence b sits at position ``kv_lens[b] - q_len_b + i`` and attends to the slots
  at or before it. Query head h reads KV head h // G (the order of Hugging Face's repeat_kv).
- Rows at or after ``cu_q_lens[num_seqs]`` are padding: their output is zero.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
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

MASK_VALUE = -1e30


def _check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs):
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected q [T, H, D] and pages [K, P, L, D], got {q.shape=}, {k_pages.shape=}, "
                         f"{v_pages.shape=}")
    if q.shape[2] != k_pages.shape[3] or q.shape[1] % k_pages.shape[0]:
        raise ValueError(f"head_dim or GQA grouping mismatch: {q.shape=}, {k_pages.shape=}")
    num_seqs_max = page_indices.shape[0]
    if kv_lens.shape != (num_seqs_max,) or cu_q_lens.shape != (num_seqs_max + 1,) or num_seqs.shape != (1,):
        raise ValueError(f"expected kv_lens [B], cu_q_lens [B+1], num_seqs [1], got {kv_lens.shape=}, "
                         f"{cu_q_lens.shape=}, {num_seqs.shape=} for {page_indices.shape=}")
    for name, array in (("kv_lens", kv_lens), ("page_indices", page_indices), ("cu_q_lens", cu_q_lens),
                        ("num_seqs", num_seqs)):
        if array.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {array.dtype}")


def _ragged_paged_attention_kernel(
    block_seq_ref,  # [NB] sequence of each query block
    block_pos_ref,  # [NB] position of each block's first query token
    block_kv_ref,  # [NB] KV slots each block can see; 0 for unused blocks
    page_indices_ref,  # [B * pages_per_seq]
    q_ref,  # [R, D] rows g * block_q + i: head g of the KV head, query i of the block
    k_pages_ref,  # [P, L, D] this KV head's pages; Mosaic: [K, P, L, D] left in HBM
    v_pages_ref,  # same as k_pages_ref
    o_ref,  # [R, D]
    *scratch,  # Mosaic only: k_buf, v_buf [2, pages_per_block * L, D] (double buffer), sems DMA[2, 2]
    block_q: int,
    pages_per_block: int,
    pages_per_seq: int,
    sm_scale: float,
):
    """One program: the G * block_q query rows of one (query block, KV head), online softmax over pages."""
    block, kv_head = pl.program_id(0), pl.program_id(1)
    seq, pos0, num_kv = block_seq_ref[block], block_pos_ref[block], block_kv_ref[block]
    rows, head_dim = q_ref.shape
    page_size = v_pages_ref.shape[-2]
    kv_block = pages_per_block * page_size
    num_steps = lax.div(num_kv + kv_block - 1, kv_block)

    def first_page(step):
        return seq * pages_per_seq + step * pages_per_block

    load_kv = paged_kv_loader(scratch, k_pages_ref, v_pages_ref, page_indices_ref, kv_head, first_page,
                              pages_per_block, num_steps)

    q = q_ref[...]
    # Row g * block_q + i holds query i of the block, at position pos0 + i (rows past G * block_q
    # and queries past the sequence's end are padding that is never read back).
    q_pos = pos0 + lax.rem(lax.broadcasted_iota(jnp.int32, (rows, kv_block), 0), block_q)  # [R, L']
    slot_in_block = lax.broadcasted_iota(jnp.int32, (rows, kv_block), 1)  # [R, L']

    def body(step, carry):
        keys, values = load_kv(step)  # [L', D] each, L' = pages_per_block * L
        scores = lax.dot_general(q, keys.astype(q.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * sm_scale  # [R, L']
        slot = step * kv_block + slot_in_block
        visible = (slot <= q_pos) & (slot < num_kv)
        return online_softmax_step(carry, scores, visible, values, MASK_VALUE)

    init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    _, l_final, acc = lax.fori_loop(0, num_steps, body, init)
    o_ref[...] = (acc / jnp.where(l_final == 0.0, 1.0, l_final)).astype(o_ref.dtype)


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                           page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, *,
                           sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                           interpret: bool | pltpu.InterpretParams | None = None,
                           gpu_body: str | None = None) -> jax.Array:
    """Pallas ragged paged attention (module docstring gives the contract). Returns [T, H, D] q.dtype.

    q [T, H, D] float; k_pages, v_pages [K, P, L, D] of one float dtype; kv_lens [B],
    page_indices [B, pages_per_seq], cu_q_lens [B+1], num_seqs [1], all int32. Page-table entries
    are clamped into [0, P). ``block_sizes`` defaults to ``BlockSizes.get_default(page_size=L)``.

    Layout: the wrapper splits every sequence's queries into blocks of ``block_q`` tokens (a fixed
    number NB of blocks, the unused ones empty) and gathers each (block, KV head)'s G * block_q
    query rows into one [R, D] tile; the grid is (NB, K) and each program loops over the pages its
    queries can see. This function resolves ``interpret`` and ``block_sizes`` on every call, then
    calls a jitted implementation that takes them as static arguments.

    ``interpret``: None resolves via ``_backend.resolve_interpret``; True runs the Triton-style
    body in the generic interpreter; a ``pltpu.InterpretParams`` runs the Mosaic body (DMAs, SMEM)
    in the TPU interpreter; a ``plgpu.InterpretGPUParams`` runs the Mosaic GPU body in its interpreter
    (jax >= 0.11); False compiles, picking the Mosaic body when lowered for TPU and on a GPU the Triton
    body, or the Mosaic GPU body (``paged_attention_mgpu``) where ``gpu_body`` (default
    JAXINFER_GPU_BODY) is "mosaic" and it serves the shapes.
    """
    _check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if not jnp.issubdtype(q.dtype, jnp.floating) or k_pages.dtype != v_pages.dtype \
            or not jnp.issubdtype(k_pages.dtype, jnp.floating):
        raise ValueError(f"expected floating q and pages of one floating dtype, got {q.dtype=}, "
                         f"{k_pages.dtype=}, {v_pages.dtype=}")
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(page_size=k_pages.shape[2])
    interpret = resolve_interpret(interpret)
    kv_block = block_sizes.pages_per_block * k_pages.shape[2]
    group = q.shape[1] // k_pages.shape[0]
    supported = mgpu.supported(q.dtype, k_pages.dtype, head_dim=q.shape[2], page_size=k_pages.shape[2],
                               pages_per_block=block_sizes.pages_per_block, rows=group * block_sizes.block_q)
    mosaic_gpu = use_mosaic_gpu(
        interpret, gpu_body, supported,
        f"16-bit q and pages of one dtype, head_dim and pages_per_block * page_size multiples of {mgpu.TILE}, "
        f"page_size a multiple of 8 and G * block_q <= {mgpu.MAX_ROWS}, got {q.shape=}, {k_pages.shape=}, "
        f"{q.dtype=}, {k_pages.dtype=}, {block_sizes=}")
    if interpret is False and not all(n >= 16 and n & (n - 1) == 0 for n in (q.shape[2], kv_block)):
        raise ValueError(f"compiled kernels need head_dim and pages_per_block * page_size to be powers of two "
                         f">= 16 (Triton dots), got {q.shape=}, {k_pages.shape=}, {block_sizes=}")
    scale = q.shape[2] ** -0.5 if sm_scale is None else float(sm_scale)
    return _ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                   sm_scale=scale, block_sizes=block_sizes, interpret=interpret,
                                   mosaic_gpu=mosaic_gpu)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret", "mosaic_gpu"))
def _ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
                            block_sizes, interpret, mosaic_gpu):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    max_num_seqs, pages_per_seq = page_indices.shape
    group = num_heads // num_kv_heads
    block_q, pages_per_block = block_sizes.block_q, block_sizes.pages_per_block
    rows = mgpu.tile_rows(group * block_q) if mosaic_gpu else max(16, _next_power_of_two(group * block_q))

    # Query blocks: sequence b gets ceil(q_len_b / block_q) consecutive blocks. With at most
    # min(B, T) non-empty sequences, sum_b ceil(q_len_b / block_q) <= num_blocks; the rest are unused.
    num_blocks = max(1, (num_tokens + min(max_num_seqs, num_tokens) * (block_q - 1)) // block_q)
    live = jnp.arange(max_num_seqs + 1) <= num_seqs[0]
    cu_q = jnp.where(live, cu_q_lens, cu_q_lens[num_seqs[0]])  # [B+1], flat after the live sequences
    q_lens = cu_q[1:] - cu_q[:-1]  # [B]
    seq_blocks = lax.div(q_lens + block_q - 1, block_q)  # [B]
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(seq_blocks, dtype=jnp.int32)])  # [B+1]
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    block_seq = jnp.minimum(jnp.searchsorted(cu_blocks[1:], blocks, side="right", method="compare_all"),
                            max_num_seqs - 1).astype(jnp.int32)  # [NB]
    block_start = (blocks - cu_blocks[block_seq]) * block_q  # first query of the block within its sequence
    block_rows = jnp.where(blocks < cu_blocks[-1], jnp.minimum(block_q, q_lens[block_seq] - block_start), 0)
    block_pos = kv_lens[block_seq] - q_lens[block_seq] + block_start  # [NB]
    block_kv = jnp.clip(block_pos + block_rows, 0, kv_lens[block_seq])  # last real query's position + 1
    block_kv = jnp.where(block_rows > 0, block_kv, 0)

    # Gather each block's queries into the kernel's [R, D] layout (row g * block_q + i), zeros elsewhere.
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    tokens = cu_q[block_seq][:, None] + block_start[:, None] + offsets  # [NB, block_q]
    q_blocks = jnp.where((offsets < block_rows[:, None])[:, :, None, None],
                         q[jnp.clip(tokens, 0, num_tokens - 1)], 0)  # [NB, block_q, H, D]
    q_blocks = q_blocks.reshape(num_blocks, block_q, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q_blocks = q_blocks.reshape(num_blocks, num_kv_heads, group * block_q, head_dim)
    q_blocks = jnp.pad(q_blocks, ((0, 0), (0, 0), (0, rows - group * block_q), (0, 0)))  # [NB, K, R, D]

    # Page table flattened (SMEM pads 2-D arrays to 128 lanes) and padded to whole KV steps.
    padded_pages = -(-pages_per_seq // pages_per_block) * pages_per_block
    flat_pages = jnp.pad(jnp.clip(page_indices, 0, num_pages - 1), ((0, 0), (0, padded_pages - pages_per_seq)))
    scalars = (block_seq, block_pos.astype(jnp.int32), block_kv.astype(jnp.int32), flat_pages.reshape(-1))

    kernel = functools.partial(_ragged_paged_attention_kernel, block_q=block_q, pages_per_block=pages_per_block,
                               pages_per_seq=padded_pages, sm_scale=sm_scale)
    out_shape = jax.ShapeDtypeStruct(q_blocks.shape, q.dtype)
    name = f"ragged_paged_attention_bq{block_q}_ppb{pages_per_block}"
    grid = (num_blocks, num_kv_heads)

    def mosaic_call(interpret_params):
        block_spec = pl.BlockSpec((None, None, rows, head_dim), lambda j, k, *_: (j, k, 0, 0))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),  # block metadata and page table -> SMEM
            grid=grid,
            in_specs=[
                block_spec,  # q blocks
                pl.BlockSpec(memory_space=pl.ANY),  # k pages stay in HBM; pages are DMA'd per step
                pl.BlockSpec(memory_space=pl.ANY),  # v pages
            ],
            out_specs=block_spec,
            scratch_shapes=[pltpu.VMEM((2, pages_per_block * page_size, head_dim), k_pages.dtype),
                            pltpu.VMEM((2, pages_per_block * page_size, head_dim), v_pages.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))],  # [k or v, buffer slot]
        )
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec, name=name, interpret=interpret_params,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        )(*scalars, q_blocks, k_pages, v_pages)

    def triton_call(interpret_flag):
        block_spec = pl.BlockSpec((None, None, rows, head_dim), lambda j, k: (j, k, 0, 0))
        pool_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda j, k: (k, 0, 0, 0))
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=grid, name=name, interpret=interpret_flag,
            in_specs=[pl.no_block_spec] * len(scalars)  # block metadata and page table, read as scalars
            + [block_spec, pool_spec, pool_spec],  # q blocks; k and v pages of this KV head
            out_specs=block_spec,
            compiler_params=None if interpret_flag else pltriton.CompilerParams(num_warps=4, num_stages=2),
        )(*scalars, q_blocks, k_pages, v_pages)

    def mosaic_gpu_call(interpret_params):
        # each block's own page table (its sequence's row), and its queries' positions for the causal mask
        block_pages = flat_pages[block_seq].reshape(-1)
        causal = mgpu.Visibility(inputs=(scalars[1],), rule=functools.partial(_causal_rule, block_q=block_q))
        return mgpu.paged_attention_mgpu(q_blocks, k_pages, v_pages, block_pages, scalars[2], causal,
                                         pages_per_block=pages_per_block, pages_per_item=padded_pages,
                                         sm_scale=sm_scale, out_dtype=q.dtype, interpret=interpret_params)

    out_blocks = run_kernel(mosaic_call, triton_call, interpret, mosaic_gpu_call if mosaic_gpu else None)

    # Back to token order: token t of sequence b (offset o) is row o % block_q of block cu_blocks[b] + o // block_q.
    out_blocks = out_blocks[:, :, :group * block_q].reshape(num_blocks, num_kv_heads, group, block_q, head_dim)
    out_blocks = out_blocks.transpose(0, 3, 1, 2, 4).reshape(num_blocks * block_q, num_heads, head_dim)
    token_ids = jnp.arange(num_tokens, dtype=jnp.int32)
    token_seq = jnp.minimum(jnp.searchsorted(cu_q[1:], token_ids, side="right", method="compare_all"),
                            max_num_seqs - 1)
    offset = token_ids - cu_q[token_seq]
    index = (cu_blocks[token_seq] + offset // block_q) * block_q + offset % block_q
    out = out_blocks[jnp.clip(index, 0, num_blocks * block_q - 1)]
    valid = (token_ids >= cu_q[0]) & (token_ids < cu_q[-1])
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def _causal_rule(refs, block, slots, rows, *, block_q: int):
    """Row g * block_q + i of a block holds its query i, at position block_pos[block] + i: it sees the slots
    at or before that position (the Mosaic GPU body's visibility rule)."""
    (block_pos_ref,) = refs
    return slots <= block_pos_ref[block] + lax.rem(rows, block_q)


_DECODE_ROW_CHUNK = 8


def _decode_rows(q, page_indices, kv_lens, k_pages, v_pages, scale):
    """One query per row: q [R, K, G, D] over its own pages page_indices [R, Pd] -> [R, K, G, D] f32."""
    num_kv_heads, head_dim = k_pages.shape[0], k_pages.shape[3]
    rows = q.shape[0]
    keys = jnp.take(k_pages, page_indices, axis=1, mode="clip")  # [K, R, Pd, L, D]
    keys = keys.reshape(num_kv_heads, rows, -1, head_dim)  # [K, R, S, D]
    values = jnp.take(v_pages, page_indices, axis=1, mode="clip").reshape(num_kv_heads, rows, -1, head_dim)
    # Batch axes (K, R) lead on both operands: only the small q and output are transposed.
    scores = jnp.einsum("kbgd,kbsd->kbgs", q.transpose(1, 0, 2, 3), keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(keys.shape[2])[None, :] < kv_lens[:, None]  # [R, S]
    probs = jax.nn.softmax(jnp.where(visible[None, :, None, :], scores, MASK_VALUE), axis=-1)
    out = jnp.einsum("kbgs,kbsd->kbgd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return out.transpose(1, 0, 2, 3)


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_q_len", "max_kv_tokens"))
def ragged_paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                                     page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, *,
                                     sm_scale: float | None = None, max_q_len: int | None = None,
                                     max_kv_tokens: int | None = None) -> jax.Array:
    """Pure-jnp ragged paged attention (module docstring gives the contract). Returns [T, H, D] q.dtype.

    Two static hints pick a formulation XLA runs fast; they never change the result as long as the
    caller's promise holds:
    - ``max_q_len=1``: every sequence has exactly one query (decode), so cu_q_lens[b] = b and
      T = B. Each row then reads only its own pages ([B, S] scores).
    - ``max_kv_tokens``: a bound on sum(kv_lens[:num_seqs]). The general formulation gathers the
      sequences' KV back to back into that many slots and masks queries to their own segment
      ([T, max_kv_tokens] scores); without it the bound is B * pages_per_seq * L.
    """
    _check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    seq_ids = jnp.arange(page_indices.shape[0])
    if max_q_len == 1:
        if num_tokens != page_indices.shape[0]:
            raise ValueError(f"max_q_len=1 needs one query row per sequence, got {q.shape=}, "
                             f"{page_indices.shape=}")
        qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)  # [B, K, G, D]
        rows = _DECODE_ROW_CHUNK if num_tokens > _DECODE_ROW_CHUNK and num_tokens % _DECODE_ROW_CHUNK == 0 \
            else num_tokens
        # Chunks of rows through lax.map keep each chunk's gathered pages in cache: 2-3x faster on
        # CPU than one gather of every row's pages at batch 32.
        chunks = (qg.reshape(-1, rows, num_kv_heads, group, head_dim),
                  page_indices.reshape(-1, rows, page_indices.shape[1]), kv_lens.reshape(-1, rows))
        out = jax.lax.map(lambda c: _decode_rows(*c, k_pages, v_pages, scale), chunks)
        out = out.reshape(num_tokens, num_kv_heads, group, head_dim)
        valid = (seq_ids < num_seqs[0]) & (kv_lens > 0)
        out = jnp.where(valid[:, None, None, None], out, 0.0)
        return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)

    # The sequences' pages back to back: gathering whole pages (L * D contiguous values) is several
    # times faster on CPU than gathering slot by slot.
    num_seqs_max, pages_per_seq = page_indices.shape
    lens = jnp.where(seq_ids < num_seqs[0], kv_lens, 0)
    cu_pages = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum((lens + page_size - 1) // page_size,
                                                                    dtype=jnp.int32)])  # [B+1]
    total_pages = page_indices.size if max_kv_tokens is None else \
        min(page_indices.size, -(-max_kv_tokens // page_size) + num_seqs_max)
    flat_page = jnp.arange(total_pages, dtype=jnp.int32)
    page_seq = jnp.searchsorted(cu_pages[1:], flat_page, side="right", method="compare_all")  # [NP]
    page_seq_c = jnp.minimum(page_seq, num_seqs_max - 1)
    page_in_seq = flat_page - cu_pages[page_seq_c]
    physical = page_indices[page_seq_c, jnp.clip(page_in_seq, 0, pages_per_seq - 1)]
    keys = jnp.take(k_pages, physical, axis=1, mode="clip").reshape(num_kv_heads, -1, head_dim)  # [K, S, D]
    values = jnp.take(v_pages, physical, axis=1, mode="clip").reshape(num_kv_heads, -1, head_dim)
    kv_seq = jnp.repeat(page_seq, page_size)  # [S]
    kv_off = (page_in_seq[:, None] * page_size + jnp.arange(page_size)).reshape(-1)  # position in its sequence
    kv_valid = (kv_seq < num_seqs_max) & (kv_off < lens[jnp.minimum(kv_seq, num_seqs_max - 1)])

    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    q_seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], rows, side="right", method="compare_all"),
                        page_indices.shape[0] - 1)  # [T]
    q_len = cu_q_lens[q_seq + 1] - cu_q_lens[q_seq]
    q_pos = kv_lens[q_seq] - q_len + rows - cu_q_lens[q_seq]
    q_valid = rows < cu_q_lens[num_seqs[0]]
    visible = ((q_seq[:, None] == kv_seq[None, :]) & (kv_off[None, :] <= q_pos[:, None])
               & kv_valid[None, :] & q_valid[:, None])  # [T, S]
    # One [G*T, D] x [D, S] matmul per KV head (faster on CPU XLA than a 5-D einsum).
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    qg = qg.reshape(num_kv_heads, group * num_tokens, head_dim)  # [K, G*T, D]
    scores = jnp.einsum("kqd,ksd->kqs", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(num_kv_heads, group, num_tokens, -1)
    probs = jax.nn.softmax(jnp.where(visible[None, None], scores, MASK_VALUE), axis=-1)
    probs = probs.reshape(num_kv_heads, group * num_tokens, -1)
    out = jnp.einsum("kqs,ksd->kqd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    out = out.reshape(num_kv_heads, group, num_tokens, head_dim).transpose(2, 0, 1, 3)
    out = jnp.where(q_valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes of the kernel (static).

    ``block_q`` query tokens of one sequence and one KV head's G query heads form the G * block_q
    rows of one program's matrix (padded to a power of two >= 16, as Triton's dots need);
    ``pages_per_block`` pages (pages_per_block * L slots) are loaded per step of the KV loop.
    """

    block_q: int = 16
    pages_per_block: int = 4

    def __post_init__(self):
        for name in ("block_q", "pages_per_block"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two, got {value}")

    @classmethod
    def get_default(cls, *, page_size: int, max_q_len: int | None = None) -> BlockSizes:
        """At least 64 KV slots per step; one query per block for decode-only batches (max_q_len=1)."""
        block_q = 16 if max_q_len is None else min(16, _next_power_of_two(max_q_len))
        return cls(block_q=block_q, pages_per_block=max(1, 64 // page_size))


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
