"""Mosaic GPU body of UniSparse block-sparse attention, for Hopper (the Pallas Triton backend that the
other GPU body uses is deprecated from jax 0.11). Same contract as ``block_sparse_attention``.

One kernel instance per (query block, query head), one warpgroup: the query block is copied into
shared memory by the TMA engine, then for each kept key block (``indices``, ``steps`` of them) its keys
and values are copied in, double-buffered (step n + 1's blocks stream in while step n computes), and
the two products run on the tensor cores (``wgmma``, accumulating in float32 registers in the WGMMA
layout) around an online softmax; the causal and ``kv_len`` masks are applied by absolute position.
wgmma takes 16-bit operands in tiles of 64: the body serves bfloat16 and float16 with block_size and
head_dim multiples of 64 (``supported``); other shapes keep the Triton body.

In the Mosaic GPU interpreter (``plgpu.InterpretGPUParams``, jax >= 0.11, runs on CPU) the two products
run as jnp dots, since wgmma has no interpretation there; the copies, barriers, masks and the softmax
run as written. Not yet run compiled on a GPU: it is opt-in (JAXINFER_GPU_BODY=mosaic) until the device
check has validated it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mgpu import TILE, flash_finish, flash_init, flash_step, smem_tile


def supported(q_dtype, kv_dtype, block_size: int, head_dim: int) -> bool:
    """Whether this body can run these shapes (else the Triton body does)."""
    return jnp.dtype(q_dtype) == jnp.dtype(kv_dtype) and \
        jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and \
        block_size % TILE == 0 and head_dim % TILE == 0


def block_sparse_attention_mgpu(q, k, v, steps, indices, bounds, *, block_size: int, sm_scale: float,
                                interpret=None):
    """q [Tq, H, D]; k, v [Tk, K, D]; steps [H * Nq] and indices [H * Nq * Nk] int32 (clamped, as the
    wrapper prepares them); bounds [2] = (q_start, kv_len). Returns [Tq, H, D] in q's dtype."""
    num_q_tokens, num_heads, head_dim = q.shape
    num_k_tokens, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    num_q_blocks, num_k_blocks = num_q_tokens // block_size, num_k_tokens // block_size
    size = block_size
    compiled = interpret is None

    def kernel(q_ref, k_ref, v_ref, steps_ref, indices_ref, bounds_ref, o_ref, q_smem, k_smem, v_smem,
               q_barrier, k_barriers, v_barriers):
        q_block, head = lax.axis_index("q_block"), lax.axis_index("head")
        kv_head = lax.div(head, group)
        item = head * num_q_blocks + q_block
        q_start, kv_len = bounds_ref[0], bounds_ref[1]
        count = steps_ref[item]
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_block * size, size), head], q_smem, q_barrier)

        def fetch(n, slot):  # step n's key and value blocks into buffer slot ``slot``
            start = indices_ref[item * num_k_blocks + n] * size
            plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(start, size), kv_head], k_smem.at[slot], k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[pl.ds(start, size), kv_head], v_smem.at[slot], v_barriers.at[slot])

        pl.when(count > 0)(lambda: fetch(0, 0))
        plgpu.barrier_wait(q_barrier)
        layout = plgpu.Layout.WGMMA
        rows = plgpu.broadcasted_iota(jnp.int32, (size, size), 0, layout=layout)
        cols = plgpu.broadcasted_iota(jnp.int32, (size, size), 1, layout=layout)
        q_pos = q_start + q_block * size + rows

        def step(n, carry):
            slot = lax.rem(n, 2)
            # the next blocks stream into the other slot while this step computes; that slot's last
            # readers (step n - 1's products) have completed, their results having been read
            pl.when(n + 1 < count)(lambda: fetch(n + 1, 1 - slot))
            key_pos = indices_ref[item * num_k_blocks + n] * size + cols
            visible = (key_pos <= q_pos) & (key_pos < kv_len)
            return flash_step(carry, q_smem, k_smem.at[slot], v_smem.at[slot], k_barriers.at[slot],
                              v_barriers.at[slot], visible, sm_scale=sm_scale, compiled=compiled)

        out = flash_finish(lax.fori_loop(0, count, step, flash_init(size, head_dim)))
        q_smem[...] = out.astype(q_smem.dtype)  # the query tile is done with: it stages the output
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[pl.ds(q_block * size, size), head])
        plgpu.wait_smem_to_gmem(0)

    tile = smem_tile((size, head_dim), q.dtype)
    slots = smem_tile((2, size, head_dim), q.dtype)  # double buffer
    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(num_q_blocks, num_heads),
        grid_names=("q_block", "head"),
        scratch_types=[tile, slots, slots, plgpu.Barrier(), plgpu.Barrier(num_barriers=2),
                       plgpu.Barrier(num_barriers=2)],
        interpret=interpret)
    return call(q, k, v, steps, indices, bounds)
