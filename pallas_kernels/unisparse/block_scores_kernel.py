"""UniSparse block scoring as a Pallas kernel: equal to ``reference.block_scores`` (see its docstring).

The wrapper average-pools queries (c_q) and keys (c_k) into composite tokens in jnp (O(T * D)). One
program per (query head, query block) takes the block's S / c_q composite queries and walks the KV head's
composite keys in chunks of ``CHUNK_BLOCKS`` key blocks, twice: first for each row's softmax max and sum
(online), then for the probabilities, which a matmul by a 0/1 [chunk, CHUNK_BLOCKS] membership matrix
sums per key block. Masking follows ``reference.composite_visible``; chunks past the query block's last
visible key are skipped (their scores are 0). The result is divided by S / c_q.

Triton needs power-of-two tiles of at least 16: the wrapper zero-pads the head dim, the composite rows
and each key block's composite keys up to that (padded keys are masked, padded blocks sliced off), so
any shape that ``reference.block_scores`` takes runs compiled too.

No Mosaic GPU body: where the GPU kernels run on Mosaic GPU (``gpu_body`` "mosaic"), scoring runs as XLA
(``xla.chunked_block_scores``, float32 GEMMs) instead of Triton, for three reasons. The products must be
float32-exact (HIGHEST), as the block selection at tau follows small differences in the scores, and
wgmma takes float32 operands only as tf32 (10-bit mantissa). A CUDA-core formulation needs what Mosaic
GPU's register layouts do not offer: sums over groups of columns of a tile (the per-key-block mass; this
kernel does it with a 0/1 membership matmul, which would again be a tf32 wgmma). And a query block has
only S / c_q = 8-16 composite rows against wgmma's 64: three quarters of every tile would be padding.
Scoring costs O((T / c)^2 * D), a small share next to the attention it prunes, which cuBLAS serves well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._backend import is_mosaic_gpu_interpret, resolve_gpu_body, resolve_interpret, run_kernel
from pallas_kernels.unisparse.reference import Sparsity, check_blocking
from pallas_kernels.unisparse.xla import chunked_block_scores

CHUNK_BLOCKS = 16  # key blocks per step of the kernel's loops (the N of Triton's membership dot)
MASK_VALUE = -1e30


def _block_scores_kernel(
    bounds_ref,  # [2] q_start, kv_len (clipped to Tk)
    qc_ref,  # [R, D'] one head's composite queries of one query block; rows >= S / c_q are padding
    kc_ref,  # [NC, C, D'] the KV head's composite keys in chunks of C = CHUNK_BLOCKS * per_k'
    key_start_ref,  # [1, C] int32 first position of each composite key of a chunk, from the chunk's start
    member_ref,  # [C, CHUNK_BLOCKS] 1.0 where composite key b of a chunk lies in the chunk's key block j
    o_ref,  # [NC, 1, CHUNK_BLOCKS] estimated attention mass per key block
    *,
    block_size: int,
    c_q: int,
    per_q: int,
    sm_scale: float,
):
    """Softmax of one query block's composite rows over the composite keys, summed per key block."""
    q_block = pl.program_id(1)
    q_start, kv_len = bounds_ref[0], bounds_ref[1]
    rows = qc_ref.shape[0]
    chunk_span = CHUNK_BLOCKS * block_size  # key positions per chunk
    q = qc_ref[...]
    row = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    last_query = q_start + (q_block * per_q + row + 1) * c_q - 1  # [R, 1] the composite's last position
    row_real = row < per_q
    # Keys at positions >= min(kv_len, the block's end) are invisible to every row of the block.
    visible_end = jnp.minimum(kv_len, q_start + (q_block + 1) * per_q * c_q)
    num_live = lax.div(jnp.maximum(visible_end, 0) + chunk_span - 1, chunk_span)

    def masked_logits(chunk):
        logits = lax.dot_general(q, kc_ref[chunk], (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32) * sm_scale  # [R, C]
        key_start = chunk * chunk_span + key_start_ref[...]  # [1, C]
        visible = (key_start <= last_query) & (key_start < kv_len) & row_real  # [R, C]
        return jnp.where(visible, logits, MASK_VALUE), visible

    def stats(chunk, carry):
        m_prev, l_prev = carry  # [R, 1] f32 each
        logits, visible = masked_logits(chunk)
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
        probs = jnp.where(visible, jnp.exp(logits - m_next), 0.0)
        return m_next, jnp.exp(m_prev - m_next) * l_prev + jnp.sum(probs, axis=1, keepdims=True)

    m, total = lax.fori_loop(0, num_live, stats, (jnp.full((rows, 1), MASK_VALUE, jnp.float32),
                                                  jnp.zeros((rows, 1), jnp.float32)))
    inv_total = 1.0 / jnp.where(total == 0.0, 1.0, total)

    def scatter(chunk, carry):
        logits, visible = masked_logits(chunk)
        probs = jnp.where(visible, jnp.exp(logits - m), 0.0) * inv_total  # [R, C]
        mass = jnp.dot(probs, member_ref[...], precision=lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)  # [R, CHUNK_BLOCKS]
        o_ref[chunk] = jnp.sum(mass, axis=0, keepdims=True) * (1.0 / per_q)
        return carry

    def zero(chunk, carry):
        o_ref[chunk] = jnp.zeros((1, CHUNK_BLOCKS), jnp.float32)
        return carry

    lax.fori_loop(0, num_live, scatter, 0)
    lax.fori_loop(num_live, o_ref.shape[0], zero, 0)


def block_scores_pallas(q: jax.Array, k: jax.Array, config: Sparsity, q_start: jax.Array | int = 0,
                        kv_len: jax.Array | int | None = None, *,
                        interpret: bool | pltpu.InterpretParams | None = None,
                        gpu_body: str | None = None) -> jax.Array:
    """[H, Nq, Nk] float32 block scores, equal to ``reference.block_scores`` (same arguments).

    q [Tq, H, D], k [Tk, K, D] floating; q_start and kv_len (default Tk) may be traced int32 scalars.
    ``interpret``: None resolves via ``_backend.resolve_interpret``; True runs the kernel in the
    generic interpreter; a ``pltpu.InterpretParams`` runs the Mosaic call in the TPU interpreter; False
    compiles (Mosaic when lowered for TPU; on a GPU Triton, or XLA where ``gpu_body``, default
    JAXINFER_GPU_BODY, is "mosaic": see the module docstring). A ``plgpu.InterpretGPUParams`` (the other
    kernels' Mosaic GPU interpreter) runs the XLA scoring.
    """
    check_blocking(q, k, config.block_size)
    if not jnp.issubdtype(q.dtype, jnp.floating) or not jnp.issubdtype(k.dtype, jnp.floating):
        raise ValueError(f"expected floating q and k, got {q.dtype=}, {k.dtype=}")
    interpret = resolve_interpret(interpret)
    xla_on_gpu = resolve_gpu_body(gpu_body) == "mosaic" or is_mosaic_gpu_interpret(interpret)
    kv_len = k.shape[0] if kv_len is None else kv_len
    return _block_scores(q, k, jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32), config=config,
                         interpret=interpret, xla_on_gpu=xla_on_gpu)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "xla_on_gpu"))
def _block_scores(q, k, q_start, kv_len, *, config, interpret, xla_on_gpu):
    num_q_tokens, num_heads, head_dim = q.shape
    num_k_tokens, num_kv_heads, _ = k.shape
    block_size, c_q, c_k = config.block_size, config.c_q, config.c_k
    num_q_blocks, num_k_blocks = num_q_tokens // block_size, num_k_tokens // block_size
    per_q, per_k = block_size // c_q, block_size // c_k
    group = num_heads // num_kv_heads
    # Power-of-two tiles of at least 16 (Triton): zero columns leave dot products unchanged; padded
    # composite rows, padded composite keys of a block and padded key blocks are masked or sliced off.
    dim, rows, per_k_pad = _tile(head_dim, 16), _tile(per_q, 16), _tile(per_k, 1)
    num_chunks = -(-num_k_blocks // CHUNK_BLOCKS)
    chunk = CHUNK_BLOCKS * per_k_pad

    qc = q.astype(jnp.float32).reshape(num_q_tokens // c_q, c_q, num_heads, head_dim).mean(axis=1)
    qc = qc.reshape(num_q_blocks, per_q, num_heads, head_dim).transpose(2, 0, 1, 3)  # [H, Nq, S/cq, D]
    qc = jnp.pad(qc, ((0, 0), (0, 0), (0, rows - per_q), (0, dim - head_dim)))  # [H, Nq, R, D']
    kc = k.astype(jnp.float32).reshape(num_k_blocks, per_k, c_k, num_kv_heads, head_dim).mean(axis=2)
    kc = jnp.pad(kc.transpose(2, 0, 1, 3), ((0, 0), (0, num_chunks * CHUNK_BLOCKS - num_k_blocks),
                                            (0, per_k_pad - per_k), (0, dim - head_dim)))
    kc = kc.reshape(num_kv_heads, num_chunks, chunk, dim)  # [K, NC, C, D']
    # Within a chunk, composite key b is key b % per_k' of block b // per_k'; padded keys start at 2**30,
    # past any kv_len (and chunk offsets added to it stay inside int32).
    block_of, within = np.divmod(np.arange(chunk), per_k_pad)
    key_start = np.where(within < per_k, block_of * block_size + within * c_k, 1 << 30)
    key_start = jnp.asarray(key_start[None, :], jnp.int32)  # [1, C]
    member = jnp.asarray(block_of[:, None] == np.arange(CHUNK_BLOCKS)[None, :], jnp.float32)  # [C, CHUNK_BLOCKS]
    bounds = jnp.stack([q_start, jnp.minimum(kv_len, num_k_tokens)])

    kernel = functools.partial(_block_scores_kernel, block_size=block_size, c_q=c_q, per_q=per_q,
                               sm_scale=1.0 / float(head_dim) ** 0.5)
    out_shape = jax.ShapeDtypeStruct((num_heads, num_q_blocks, num_chunks, 1, CHUNK_BLOCKS), jnp.float32)
    name = f"block_scores_s{block_size}_cq{c_q}_ck{c_k}"
    grid = (num_heads, num_q_blocks)

    def specs():  # index maps take (and ignore) Mosaic's prefetch refs after the grid indices
        def rows_index(h, i, *_):
            return h, i, 0, 0

        def scores_index(h, i, *_):
            return h, i, 0, 0, 0

        def whole(h, i, *_):
            return 0, 0

        return ([pl.BlockSpec((None, None, rows, dim), rows_index),  # composite queries of (head, query block)
                 pl.BlockSpec((None, num_chunks, chunk, dim),  # composite keys of the KV head
                              lambda h, i, *_: (lax.div(h, group), 0, 0, 0)),
                 pl.BlockSpec((1, chunk), whole),  # key starts within a chunk
                 pl.BlockSpec((chunk, CHUNK_BLOCKS), whole)],  # chunk membership
                pl.BlockSpec((None, None, num_chunks, 1, CHUNK_BLOCKS), scores_index))  # the block's scores

    def mosaic_call(interpret_params):
        in_specs, out_specs = specs()
        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1,  # (q_start, kv_len) -> SMEM
                                                 grid=grid, in_specs=in_specs, out_specs=out_specs)
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec, name=name, interpret=interpret_params,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        )(bounds, qc, kc, key_start, member)

    def triton_call(interpret_flag):
        in_specs, out_specs = specs()
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=grid, name=name, interpret=interpret_flag,
            in_specs=[pl.no_block_spec] + in_specs,  # (q_start, kv_len), read as scalars
            out_specs=out_specs,
            compiler_params=None if interpret_flag else pltriton.CompilerParams(num_warps=4, num_stages=1),
        )(bounds, qc, kc, key_start, member)

    def xla_call(_):  # [H, Nq, Nk], padded into the kernel's output layout (one type for every platform)
        scores = chunked_block_scores(q, k, config, q_start, jnp.minimum(kv_len, num_k_tokens))
        scores = jnp.pad(scores, ((0, 0), (0, 0), (0, num_chunks * CHUNK_BLOCKS - num_k_blocks)))
        return scores.reshape(out_shape.shape)

    out = run_kernel(mosaic_call, triton_call, interpret, xla_call if xla_on_gpu else None)
    return out.reshape(num_heads, num_q_blocks, num_chunks * CHUNK_BLOCKS)[:, :, :num_k_blocks]


def _tile(n: int, floor: int) -> int:
    """Smallest power of two >= max(n, floor)."""
    return 1 << (max(n, floor) - 1).bit_length()
