"""UniSparse block-sparse prefill attention as a Pallas kernel (Triton body for GPU, Mosaic body for TPU).

Contract of ``reference`` (see its docstring): keys and values [Tk, K, D] at positions 0..Tk-1, queries
[Tq, H, D] at positions q_start.., query head h reads KV head h // G, block size S; ``indices`` [H, Nq, Nk]
int32 holds each (head, query block)'s kept key blocks in ascending order (padding after ``counts``
[H, Nq] entries). Keys at positions >= kv_len are never attended.

One program per (query block, query head): its S query rows run an online softmax (f32) over the kept
key blocks only, ``fori_loop(0, count)`` loading key block ``indices[h, i, n]`` at step n. The causal
mask is applied by absolute position (key <= q_start + row), so only the diagonal block is cut. With
``causal_block_lists`` (every causal block kept) the same kernel is the dense blocked flash kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._backend import (
    online_softmax_step,
    resolve_interpret,
    run_kernel,
    use_mosaic_gpu,
)
from pallas_kernels.unisparse import block_sparse_attention_mgpu as mgpu

MASK_VALUE = -1e30


def _block_sparse_attention_kernel(
    counts_ref,  # [H * Nq] kept blocks per (head, query block), only those starting before kv_len
    indices_ref,  # [H * Nq * Nk] kept key blocks, ascending
    bounds_ref,  # [2] q_start, kv_len
    q_ref,  # [S, D] one query head's query block
    k_ref,  # [Tk, D] the KV head's keys; Mosaic: [K, Tk, D] left in HBM
    v_ref,  # same as k_ref
    o_ref,  # [S, D]
    *scratch,  # Mosaic only: k_buf, v_buf [2, S, D] (double buffer), sems DMA[2, 2]
    group: int,
    num_q_blocks: int,
    num_k_blocks: int,
    sm_scale: float,
):
    """Online softmax of one (query block, query head) over its kept key blocks."""
    q_block, head = pl.program_id(0), pl.program_id(1)
    block_size, head_dim = q_ref.shape
    item = head * num_q_blocks + q_block
    num_steps = counts_ref[item]
    first = item * num_k_blocks
    q_start, kv_len = bounds_ref[0], bounds_ref[1]

    if scratch:
        # Mosaic: K/V stay in HBM; step n's block is DMA'd into buffer slot n % 2 while step n - 1
        # computes on the other slot.
        k_buf, v_buf, sems = scratch
        kv_head = lax.div(head, group)

        def copies(step):
            slot = lax.rem(step, 2)
            start = pl.multiple_of(indices_ref[first + step] * block_size, block_size)
            for which, (src, buf) in enumerate(((k_ref, k_buf), (v_ref, v_buf))):
                yield pltpu.make_async_copy(src.at[kv_head, pl.ds(start, block_size)], buf.at[slot],
                                            sems.at[which, slot])

        def start_fetch(step):
            for copy in copies(step):
                copy.start()

        pl.when(num_steps > 0)(functools.partial(start_fetch, 0))

        def load_kv(step):
            for copy in copies(step):
                copy.wait()
            pl.when(step + 1 < num_steps)(functools.partial(start_fetch, step + 1))
            slot = lax.rem(step, 2)
            return k_buf[slot], v_buf[slot]
    else:
        # Triton and the generic interpreter: slice the block straight from the KV head's keys.
        def load_kv(step):
            start = pl.multiple_of(indices_ref[first + step] * block_size, block_size)
            return k_ref[pl.ds(start, block_size), :], v_ref[pl.ds(start, block_size), :]

    q = q_ref[...]
    q_pos = q_start + q_block * block_size + lax.broadcasted_iota(jnp.int32, (block_size, block_size), 0)
    key_in_block = lax.broadcasted_iota(jnp.int32, (block_size, block_size), 1)  # [S, S]

    def body(step, carry):
        keys, values = load_kv(step)  # [S, D] each
        scores = lax.dot_general(q, keys.astype(q.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * sm_scale  # [S, S]
        key_pos = indices_ref[first + step] * block_size + key_in_block
        visible = (key_pos <= q_pos) & (key_pos < kv_len)
        return online_softmax_step(carry, scores, visible, values, MASK_VALUE)

    init = (jnp.full((block_size, 1), MASK_VALUE, jnp.float32), jnp.zeros((block_size, 1), jnp.float32),
            jnp.zeros((block_size, head_dim), jnp.float32))
    _, l_final, acc = lax.fori_loop(0, num_steps, body, init)
    o_ref[...] = (acc / jnp.where(l_final == 0.0, 1.0, l_final)).astype(o_ref.dtype)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, counts: jax.Array, *,
                           block_size: int, q_start: jax.Array | int = 0, kv_len: jax.Array | int | None = None,
                           sm_scale: float | None = None,
                           interpret: bool | pltpu.InterpretParams | None = None,
                           gpu_body: str | None = None) -> jax.Array:
    """Pallas block-sparse attention (module docstring gives the contract). Returns [Tq, H, D] in q.dtype.

    q [Tq, H, D] float; k, v [Tk, K, D] of one float dtype; indices [H, Tq/S, Tk/S] and counts
    [H, Tq/S] int32 (as ``reference.select_blocks`` returns them; entries are clamped into range).
    q_start and kv_len (default Tk) may be traced int32 scalars. ``sm_scale`` defaults to D ** -0.5.

    ``interpret``: None resolves via ``_backend.resolve_interpret``; True runs the Triton-style body in
    the generic interpreter; a ``pltpu.InterpretParams`` runs the Mosaic body (DMAs, SMEM) in the TPU
    interpreter; a ``plgpu.InterpretGPUParams`` runs the Mosaic GPU body in its interpreter (jax >= 0.11);
    False compiles, picking the Mosaic body when lowered for TPU and on a GPU the Triton body, or the
    Mosaic GPU body where ``gpu_body`` (default JAXINFER_GPU_BODY) is "mosaic" and it serves the shapes.
    """
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected q [Tq, H, D], k and v [Tk, K, D] with K dividing H, got {q.shape=}, "
                         f"{k.shape=}, {v.shape=}")
    if block_size < 1 or q.shape[0] % block_size or k.shape[0] % block_size:
        raise ValueError(f"Tq and Tk must be multiples of {block_size=}, got {q.shape=}, {k.shape=}")
    if not jnp.issubdtype(q.dtype, jnp.floating) or k.dtype != v.dtype or not jnp.issubdtype(k.dtype, jnp.floating):
        raise ValueError(f"expected floating q and k, v of one floating dtype, got {q.dtype=}, {k.dtype=}, "
                         f"{v.dtype=}")
    num_q_blocks, num_k_blocks = q.shape[0] // block_size, k.shape[0] // block_size
    if indices.shape != (q.shape[1], num_q_blocks, num_k_blocks) or counts.shape != indices.shape[:2]:
        raise ValueError(f"expected indices [H, Nq, Nk] = [{q.shape[1]}, {num_q_blocks}, {num_k_blocks}] and "
                         f"counts [H, Nq], got {indices.shape=}, {counts.shape=}")
    if indices.dtype != jnp.int32 or counts.dtype != jnp.int32:
        raise ValueError(f"indices and counts must be int32, got {indices.dtype=}, {counts.dtype=}")
    interpret = resolve_interpret(interpret)
    mosaic_gpu = use_mosaic_gpu(
        interpret, gpu_body, mgpu.supported(q.dtype, k.dtype, block_size, q.shape[2]),
        f"16-bit q, k, v of one dtype and block_size and head_dim multiples of {mgpu.TILE}, got {q.dtype=}, "
        f"{k.dtype=}, {block_size=}, {q.shape=}")
    if interpret is False and not all(n >= 16 and n & (n - 1) == 0 for n in (block_size, q.shape[2])):
        raise ValueError(f"compiled kernels need block_size and head_dim to be powers of two >= 16 (Triton dots), "
                         f"got {block_size=}, {q.shape=}")
    scale = q.shape[2] ** -0.5 if sm_scale is None else float(sm_scale)
    kv_len = k.shape[0] if kv_len is None else kv_len
    return _block_sparse_attention(q, k, v, indices, counts, jnp.asarray(q_start, jnp.int32),
                                   jnp.asarray(kv_len, jnp.int32), block_size=block_size, sm_scale=scale,
                                   interpret=interpret, mosaic_gpu=mosaic_gpu)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "interpret", "mosaic_gpu"))
def _block_sparse_attention(q, k, v, indices, counts, q_start, kv_len, *, block_size, sm_scale, interpret,
                            mosaic_gpu):
    num_q_tokens, num_heads, head_dim = q.shape
    num_k_tokens, num_kv_heads, _ = k.shape
    num_q_blocks, num_k_blocks = num_q_tokens // block_size, num_k_tokens // block_size
    group = num_heads // num_kv_heads

    # Kept blocks that start before kv_len: a prefix of the ascending list, so the loop stops there.
    indices = jnp.clip(indices, 0, num_k_blocks - 1)
    live = (jnp.arange(num_k_blocks) < counts[..., None]) & (indices * block_size < kv_len)
    steps = live.sum(axis=-1, dtype=jnp.int32)  # [H, Nq]
    # SMEM pads 2-D arrays to 128 lanes: the lists go in flat.
    scalars = (steps.reshape(-1), indices.reshape(-1), jnp.stack([q_start, kv_len]))

    q_heads = q.transpose(1, 0, 2)  # [H, Tq, D]
    k_heads, v_heads = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [K, Tk, D]
    kernel = functools.partial(_block_sparse_attention_kernel, group=group, num_q_blocks=num_q_blocks,
                               num_k_blocks=num_k_blocks, sm_scale=sm_scale)
    out_shape = jax.ShapeDtypeStruct(q_heads.shape, q.dtype)
    name = f"block_sparse_attention_s{block_size}"
    grid = (num_q_blocks, num_heads)

    def mosaic_call(interpret_params):
        block_spec = pl.BlockSpec((None, block_size, head_dim), lambda i, h, *_: (h, i, 0))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),  # counts, block lists, (q_start, kv_len) -> SMEM
            grid=grid,
            in_specs=[
                block_spec,  # q: one head's query block
                pl.BlockSpec(memory_space=pl.ANY),  # k stays in HBM; kept blocks are DMA'd per step
                pl.BlockSpec(memory_space=pl.ANY),  # v
            ],
            out_specs=block_spec,
            scratch_shapes=[pltpu.VMEM((2, block_size, head_dim), k.dtype),
                            pltpu.VMEM((2, block_size, head_dim), v.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))],  # [k or v, buffer slot]
        )
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec, name=name, interpret=interpret_params,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        )(*scalars, q_heads, k_heads, v_heads)

    def triton_call(interpret_flag):
        block_spec = pl.BlockSpec((None, block_size, head_dim), lambda i, h: (h, i, 0))
        kv_spec = pl.BlockSpec((None, num_k_tokens, head_dim), lambda i, h: (lax.div(h, group), 0, 0))
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=grid, name=name, interpret=interpret_flag,
            in_specs=[pl.no_block_spec] * len(scalars)  # counts, block lists, bounds, read as scalars
            + [block_spec, kv_spec, kv_spec],  # q block; k and v of the KV head
            out_specs=block_spec,
            compiler_params=None if interpret_flag else pltriton.CompilerParams(num_warps=4, num_stages=2),
        )(*scalars, q_heads, k_heads, v_heads)

    def mosaic_gpu_call(interpret_params):
        return mgpu.block_sparse_attention_mgpu(q, k, v, *scalars, block_size=block_size, sm_scale=sm_scale,
                                                interpret=interpret_params)

    if mosaic_gpu:  # its own layout: [Tq, H, D] in and out
        return run_kernel(lambda p: mosaic_call(p).transpose(1, 0, 2), lambda p: triton_call(p).transpose(1, 0, 2),
                          interpret, mosaic_gpu_call)
    out = run_kernel(mosaic_call, triton_call, interpret)
    return out.transpose(1, 0, 2)


def causal_block_lists(num_heads: int, num_q_blocks: int, num_k_blocks: int,
                       q_start_block: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Block lists of dense causal attention: every key block up to the diagonal, for every head.

    Returns indices [H, Nq, Nk] int32 (indices[h, i, n] = n, padded with the diagonal block
    q_start_block + i) and counts [H, Nq] int32 (q_start_block + i + 1), clipped to Nk blocks.
    q_start_block may be traced.
    """
    last = jnp.minimum(q_start_block + jnp.arange(num_q_blocks, dtype=jnp.int32), num_k_blocks - 1)  # [Nq]
    indices = jnp.minimum(jnp.arange(num_k_blocks, dtype=jnp.int32)[None, :], last[:, None])  # [Nq, Nk]
    indices = jnp.broadcast_to(indices, (num_heads, num_q_blocks, num_k_blocks)).astype(jnp.int32)
    counts = jnp.broadcast_to(last + 1, (num_heads, num_q_blocks)).astype(jnp.int32)
    return indices, counts
