"""Mosaic GPU body of the paged attention kernels (ragged paged attention and tree attention), for Hopper:
the Pallas Triton backend that their other GPU body uses is deprecated from jax 0.11.

Both kernels hand it the same tile layout: ``q_rows`` [NB, K, R, D], one [R, D] tile per (item, KV head),
where an item is a query block of one sequence (ragged) or one request's tree (tree), and its R rows
stack the KV head's G query heads over the item's queries. One kernel instance per (item, KV head), one
warpgroup: the tile is copied into shared memory by the TMA engine, then for each block of
``pages_per_block`` pages the item can see, the pages' keys and values are copied in page by page (the
paged gather: one TMA copy per page into consecutive rows of a slot, all of a slot's copies arriving on
one barrier), double-buffered (block n + 1's pages stream in while block n computes), and the two
products run on the tensor cores (``wgmma``, float32 accumulators in the WGMMA layout) around an online
softmax. Which slots a row sees is the kernel's own rule (``Visibility``).

wgmma takes 16-bit operands in tiles of 64 rows: the body serves bfloat16 and float16 q and pages of
one dtype, head_dim and pages_per_block * page_size multiples of 64, page_size a multiple of 8 (the
shared-memory tile) and R = G * queries padded to 64 or 128 (one warpgroup holds at most 128 rows of
accumulator) (``supported``); other shapes keep the Triton body.

In the Mosaic GPU interpreter (``plgpu.InterpretGPUParams``, jax >= 0.11, runs on CPU) the two products
run as jnp dots, since wgmma has no interpretation there; the copies, barriers, masks and the softmax
run as written. Not yet run compiled on a GPU: opt-in (JAXINFER_GPU_BODY=mosaic) until the device check
has validated it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mgpu import TILE, flash_finish, flash_init, flash_step, smem_tile

MAX_ROWS = 2 * TILE  # accumulator rows one warpgroup holds in registers


def supported(q_dtype, kv_dtype, *, head_dim: int, page_size: int, pages_per_block: int, rows: int) -> bool:
    """Whether this body serves these shapes (else the Triton body does); ``rows`` = G * queries per item."""
    sixteen_bit = jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return sixteen_bit and jnp.dtype(q_dtype) == jnp.dtype(kv_dtype) and head_dim % TILE == 0 \
        and page_size % 8 == 0 and (pages_per_block * page_size) % TILE == 0 and 0 < rows <= MAX_ROWS


def tile_rows(rows: int) -> int:
    """The tile's row count for ``rows`` real rows: a multiple of wgmma's 64."""
    return -(-rows // TILE) * TILE


@dataclasses.dataclass(frozen=True)
class Visibility:
    """Which KV slots a tile's rows see, besides ``slot < num_kv[item]`` (applied by the body).

    ``inputs``: extra arrays the rule reads (GMEM refs inside the kernel); ``rule(refs, item, slots, rows)``
    -> bool [R, L'] for the absolute slots [R, L'] of one block of pages and the row indices [R, L'] (both
    int32 in the WGMMA layout)."""

    inputs: tuple[jax.Array, ...]
    rule: Callable


def paged_attention_mgpu(q_rows, k_pages, v_pages, page_table, num_kv, visibility: Visibility, *,
                         pages_per_block: int, pages_per_item: int, sm_scale: float, out_dtype,
                         interpret=None):
    """q_rows [NB, K, R, D] (R a multiple of 64); k_pages, v_pages [K, P, L, D]; page_table
    [NB * pages_per_item] int32 (item n's pages, clamped, padded to whole blocks of pages); num_kv [NB]
    int32, the slots item n visits (0: none, its output is zero). Returns [NB, K, R, D] in out_dtype."""
    num_items, num_kv_heads, rows, head_dim = q_rows.shape
    page_size = k_pages.shape[2]
    kv_block = pages_per_block * page_size
    compiled = interpret is None
    num_extra = len(visibility.inputs)

    def kernel(q_ref, k_ref, v_ref, pages_ref, num_kv_ref, *refs):
        extra, (o_ref, q_smem, o_smem, k_smem, v_smem, q_barrier, k_barriers, v_barriers) = \
            refs[:num_extra], refs[num_extra:]
        item, kv_head = lax.axis_index("item"), lax.axis_index("kv_head")
        num_slots = num_kv_ref[item]
        count = lax.div(num_slots + kv_block - 1, kv_block)
        plgpu.copy_gmem_to_smem(q_ref.at[item, kv_head], q_smem, q_barrier)

        def fetch(n, slot):  # block n's pages into buffer slot ``slot``, one copy per page
            for i in range(pages_per_block):
                page = pages_ref[item * pages_per_item + n * pages_per_block + i]
                rows_i = pl.ds(i * page_size, page_size)
                plgpu.copy_gmem_to_smem(k_ref.at[kv_head, page], k_smem.at[slot, rows_i], k_barriers.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[kv_head, page], v_smem.at[slot, rows_i], v_barriers.at[slot])

        pl.when(count > 0)(lambda: fetch(0, 0))
        plgpu.barrier_wait(q_barrier)
        layout = plgpu.Layout.WGMMA
        row_ids = plgpu.broadcasted_iota(jnp.int32, (rows, kv_block), 0, layout=layout)
        cols = plgpu.broadcasted_iota(jnp.int32, (rows, kv_block), 1, layout=layout)

        def step(n, carry):
            slot = lax.rem(n, 2)
            # the next pages stream into the other slot while this step computes; that slot's last
            # readers (step n - 1's products) have completed, their results having been read
            pl.when(n + 1 < count)(lambda: fetch(n + 1, 1 - slot))
            slots = n * kv_block + cols
            visible = (slots < num_slots) & visibility.rule(extra, item, slots, row_ids)
            return flash_step(carry, q_smem, k_smem.at[slot], v_smem.at[slot], k_barriers.at[slot],
                              v_barriers.at[slot], visible, sm_scale=sm_scale, compiled=compiled)

        out = flash_finish(lax.fori_loop(0, count, step, flash_init(rows, head_dim)))
        staging = q_smem if o_smem is None else o_smem  # the query tile is done with: it can stage the output
        staging[...] = out.astype(staging.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(staging, o_ref.at[item, kv_head])
        plgpu.wait_smem_to_gmem(0)

    same_dtype = jnp.dtype(out_dtype) == q_rows.dtype
    out_shape = jax.ShapeDtypeStruct(q_rows.shape, out_dtype)
    slots = (2, kv_block, head_dim)  # double buffer
    call = plgpu.kernel(
        _with_optional_output_tile(kernel, same_dtype), out_type=out_shape, grid=(num_items, num_kv_heads),
        grid_names=("item", "kv_head"),
        scratch_types=[smem_tile((rows, head_dim), q_rows.dtype)]
        + ([] if same_dtype else [smem_tile((rows, head_dim), out_dtype)])
        + [smem_tile(slots, k_pages.dtype), smem_tile(slots, v_pages.dtype), plgpu.Barrier(),
           plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=2),
           plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=2)],
        interpret=interpret)
    return call(q_rows, k_pages, v_pages, page_table, num_kv, *visibility.inputs)


def _with_optional_output_tile(kernel, same_dtype: bool):
    """The kernel with an output staging tile only where the output's dtype differs from the queries'."""
    if not same_dtype:
        return kernel

    def without_output_tile(*refs):
        *head, o_ref, q_smem, k_smem, v_smem, q_barrier, k_barriers, v_barriers = refs
        return kernel(*head, o_ref, q_smem, None, k_smem, v_smem, q_barrier, k_barriers, v_barriers)
    return without_output_tile
