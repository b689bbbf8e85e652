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

MASK_VALUE = -1e30
TILE = 64  # wgmma's tile edge for 16-bit operands


def supported(q_dtype, kv_dtype, block_size: int, head_dim: int) -> bool:
    """Whether this body can run these shapes (else the Triton body does)."""
    return jnp.dtype(q_dtype) == jnp.dtype(kv_dtype) and \
        jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and \
        block_size % TILE == 0 and head_dim % TILE == 0


def interpret_params():
    """The Mosaic GPU interpreter's parameters, or None where this jax has no such interpreter."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    return params() if params is not None else None


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
            acc, m_prev, l_prev = carry
            slot = lax.rem(n, 2)
            # the next blocks stream into the other slot while this step computes; that slot's last
            # readers (step n - 1's products) have completed, their results having been read
            pl.when(n + 1 < count)(lambda: fetch(n + 1, 1 - slot))
            keys, values = k_smem.at[slot], v_smem.at[slot]
            plgpu.barrier_wait(k_barriers.at[slot])
            if compiled:
                def scores_on_tensor_cores(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, keys.T)
                    return acc_ref[...]
                scores = pl.run_scoped(scores_on_tensor_cores, plgpu.ACC((size, size), jnp.float32))
            else:
                scores = lax.dot_general(q_smem[...], keys[...], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
            key_pos = indices_ref[item * num_k_blocks + n] * size + cols
            visible = (key_pos <= q_pos) & (key_pos < kv_len)
            scores = jnp.where(visible, scores * sm_scale, MASK_VALUE)
            m_next = jnp.maximum(m_prev, scores.max(axis=1))
            probs = jnp.where(visible, jnp.exp(scores - lax.broadcast_in_dim(m_next, scores.shape, [0])), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_next = alpha * l_prev + probs.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            probs = probs.astype(values.dtype)
            plgpu.barrier_wait(v_barriers.at[slot])
            if compiled:
                def values_on_tensor_cores(acc_ref):
                    plgpu.wgmma(acc_ref, probs, values)
                acc = pl.run_state(values_on_tensor_cores)(plgpu.ACC.init(acc))
            else:
                acc = acc + jnp.dot(probs, values[...], preferred_element_type=jnp.float32)
            return acc, m_next, l_next

        init = (plgpu.layout_cast(jnp.zeros((size, head_dim), jnp.float32), layout),
                plgpu.layout_cast(jnp.full((size,), MASK_VALUE, jnp.float32), layout.reduce(1)),
                plgpu.layout_cast(jnp.zeros((size,), jnp.float32), layout.reduce(1)))
        acc, _, total = lax.fori_loop(0, count, step, init)
        out = acc / lax.broadcast_in_dim(jnp.where(total == 0.0, 1.0, total), acc.shape, [0])
        q_smem[...] = out.astype(q_smem.dtype)  # the query tile is done with: it stages the output
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[pl.ds(q_block * size, size), head])
        plgpu.wait_smem_to_gmem(0)

    # shared-memory tiles as wgmma reads them: 8 x 64 tiles, 128-byte swizzle
    transforms = (plgpu.TilingTransform((8, TILE)), plgpu.SwizzleTransform(128))
    tile = plgpu.SMEM((size, head_dim), q.dtype, transforms=transforms)
    slots = plgpu.SMEM((2, size, head_dim), q.dtype, transforms=transforms)  # double buffer
    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(num_q_blocks, num_heads),
        grid_names=("q_block", "head"),
        scratch_types=[tile, slots, slots, plgpu.Barrier(), plgpu.Barrier(num_barriers=2),
                       plgpu.Barrier(num_barriers=2)],
        interpret=interpret)
    return call(q, k, v, steps, indices, bounds)
