"""The pieces the Mosaic GPU kernel bodies share: wgmma's tile, shared-memory tiles as wgmma reads them, the
interpreter's parameters, and the flash-attention step on the tensor cores (one warpgroup, float32
accumulators in the WGMMA layout).

In the Mosaic GPU interpreter (``plgpu.InterpretGPUParams``, jax >= 0.11, runs on CPU) the two products of
a step run as jnp dots, since wgmma has no interpretation there; everything else runs as written.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MASK_VALUE = -1e30
TILE = 64  # wgmma's tile edge for 16-bit operands


def interpret_params():
    """The Mosaic GPU interpreter's parameters, or None where this jax has no such interpreter."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    return params() if params is not None else None


def smem_tile(shape, dtype):
    """A shared-memory tile as wgmma reads it: 128-byte rows of 8-row tiles, swizzled."""
    columns = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, columns)), plgpu.SwizzleTransform(128)))


def load_rows(ref, layout):
    """A whole GMEM or SMEM ref into registers in ``layout`` (jax 0.10's ``plgpu.load`` takes an index
    that 0.11 deprecates in favour of ``ref.at``)."""
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def flash_init(rows: int, head_dim: int):
    """(acc [R, D], running max [R], running sum [R]) for ``flash_step``."""
    layout = plgpu.Layout.WGMMA
    return (plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), layout),
            plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), layout.reduce(1)),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), layout.reduce(1)))


def flash_step(carry, q_smem, keys, values, k_barrier, v_barrier, visible, *, sm_scale: float, compiled: bool):
    """Fold one block of keys and values (SMEM [L', D] each, arriving on their barriers) into the running
    softmax of the query tile q_smem [R, D]; ``visible`` [R, L'] bool in the WGMMA layout."""
    acc, m_prev, l_prev = carry
    plgpu.barrier_wait(k_barrier)
    if compiled:
        def scores_on_tensor_cores(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, keys.T)
            return acc_ref[...]
        scores = pl.run_scoped(scores_on_tensor_cores, plgpu.ACC(visible.shape, jnp.float32))
    else:
        scores = lax.dot_general(q_smem[...], keys[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores * sm_scale, MASK_VALUE)
    m_next = jnp.maximum(m_prev, scores.max(axis=1))
    probs = jnp.where(visible, jnp.exp(scores - lax.broadcast_in_dim(m_next, scores.shape, [0])), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + probs.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    probs = probs.astype(values.dtype)
    plgpu.barrier_wait(v_barrier)
    if compiled:
        def values_on_tensor_cores(acc_ref):
            plgpu.wgmma(acc_ref, probs, values)
        acc = pl.run_state(values_on_tensor_cores)(plgpu.ACC.init(acc))
    else:
        acc = acc + jnp.dot(probs, values[...], preferred_element_type=jnp.float32)
    return acc, m_next, l_next


def flash_finish(carry):
    """The attention output [R, D] float32 of a finished softmax (rows that saw nothing: zeros)."""
    acc, _, total = carry
    return acc / lax.broadcast_in_dim(jnp.where(total == 0.0, 1.0, total), acc.shape, [0])
