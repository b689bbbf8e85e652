"""Paged attention on CPU: XLA FFI kernels (attention.cc) that read the KV pages where they lie.

Axis letters: B rows (sequences), T query tokens, H query heads, K KV heads, G = H / K, D head_dim,
P pages in the pool, L page size. The contract is ``ragged_paged_attention_reference``'s
(pallas_kernels/ragged_paged_attention.py), which is also what these ops run:
- on any platform but CPU (``lax.platform_dependent`` lowers only the branch of the platform being
  compiled for, so GPU/TPU lowering never sees the custom call);
- on CPU when the kernels are unavailable (no compiler, or ``build.load()`` returns None), or the
  KV pages are not f32, bf16 or f16.

The reference gathers every row's pages (a few GB/s on CPU); the kernels stream them in place,
G query heads of a KV head together, spreading (row, KV head) units over XLA's intra-op threads.

``page_offset`` (the layer's first page in a pool shared by all layers) is an operand, not an
attribute: a Python int today (``index * kv.num_pages``), but an operand also takes a traced layer
index (scan over layers) and keeps one custom-call signature for every layer. It costs one [1]
constant per call.
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cpu import build
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.tree_attention import tree_attention_reference

DECODE_TARGET = "jaxinfer_paged_decode_attention"
RAGGED_TARGET = "jaxinfer_ragged_paged_attention"
TREE_TARGET = "jaxinfer_tree_attention"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
_KV_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _library() -> ctypes.CDLL | None:
    """The loaded kernel library (targets registered for cpu), or None when it cannot be built."""
    return build.load()


def kernels_available() -> bool:
    return _library() is not None


def supported_isas() -> tuple[str, ...]:
    """The isa names this host runs ("auto" first); ("auto",) without kernels (reference only)."""
    return build.isas("jaxinfer_paged_attention_isas", ISAS) if _library() is not None else ("auto",)


def _check(q, k_pages, v_pages, page_indices, isa):
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"expected q [T, H, D] and pages [K, P, L, D] of one dtype, got {q.shape=}, "
                         f"{k_pages.shape=}, {v_pages.shape=}, {k_pages.dtype=}, {v_pages.dtype=}")
    if q.shape[2] != k_pages.shape[3] or q.shape[1] % k_pages.shape[0]:
        raise ValueError(f"head_dim or GQA grouping mismatch: {q.shape=}, {k_pages.shape=}")
    if page_indices.ndim != 2:
        raise ValueError(f"expected page_indices [B, Pmax], got {page_indices.shape=}")
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {tuple(ISAS)}, got {isa!r}")


def _use_kernel(k_pages) -> bool:
    return _library() is not None and any(k_pages.dtype == dtype for dtype in _KV_DTYPES)


def _run(target: str, args: tuple, reference, scale: float, isa: str) -> jax.Array:
    """``target`` on CPU where the kernels serve these pages, ``reference`` elsewhere; args[0] is the query
    rows [rows, H, D] float32, which is also the output's shape."""
    if not _use_kernel(args[1]):
        return reference(*args)

    def kernel(*args):
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(args[0].shape, jnp.float32))
        return call(*args, sm_scale=np.float32(scale), isa=np.int32(ISAS[isa]))

    return jax.lax.platform_dependent(*args, cpu=kernel, default=reference)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                           page_indices: jax.Array, num_seqs: jax.Array, page_offset: jax.Array | int = 0, *,
                           sm_scale: float | None = None, isa: str = "auto") -> jax.Array:
    """Decode attention, one query per row: q [B, H, D] -> [B, H, D] float32.

    k_pages, v_pages [K, P, L, D] (f32, bf16 or f16 for the kernel); kv_lens [B] (the new token
    counted), page_indices [B, Pmax] (pages of the layer, before ``page_offset``), num_seqs [1], all
    int32; page_offset an int or an int32 scalar/[1] array added to every page index. Rows
    b >= num_seqs or with kv_lens[b] == 0 are zero. ``sm_scale`` defaults to D ** -0.5.
    ``isa``: "auto" (the widest the host runs), or "scalar" | "avx2" | "avx512" to force one (tests);
    a forced isa the host lacks fails at run time.
    """
    _check(q, k_pages, v_pages, page_indices, isa)
    if kv_lens.shape != (q.shape[0],) or page_indices.shape[0] != q.shape[0]:
        raise ValueError(f"expected kv_lens [B] and page_indices [B, Pmax] for {q.shape=}, got "
                         f"{kv_lens.shape=}, {page_indices.shape=}")
    scale = float(q.shape[2] ** -0.5 if sm_scale is None else sm_scale)
    offset = jnp.asarray(page_offset, jnp.int32).reshape(1)
    args = (q.astype(jnp.float32), k_pages, v_pages, kv_lens, page_indices, num_seqs, offset)

    def reference(q, k_pages, v_pages, kv_lens, page_indices, num_seqs, offset):
        cu_q_lens = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
        return ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_indices + offset[0], cu_q_lens,
                                                num_seqs, sm_scale=scale, max_q_len=1).astype(jnp.float32)

    return _run(DECODE_TARGET, args, reference, scale, isa)


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                           page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array,
                           page_offset: jax.Array | int = 0, *, sm_scale: float | None = None,
                           max_kv_tokens: int | None = None, isa: str = "auto") -> jax.Array:
    """Ragged causal attention (prompt chunks): q [T, H, D] -> [T, H, D] float32.

    Sequence b < num_seqs owns query rows cu_q_lens[b]:cu_q_lens[b+1]; its row i sits at position
    kv_lens[b] - q_len_b + i and sees the slots at or before it. Rows at or after
    cu_q_lens[num_seqs] are zero. ``max_kv_tokens`` only sizes the reference's gather (see its
    docstring); other arguments as in ``paged_decode_attention``.
    """
    _check(q, k_pages, v_pages, page_indices, isa)
    num_seqs_max = page_indices.shape[0]
    if kv_lens.shape != (num_seqs_max,) or cu_q_lens.shape != (num_seqs_max + 1,):
        raise ValueError(f"expected kv_lens [B] and cu_q_lens [B+1] for {page_indices.shape=}, got "
                         f"{kv_lens.shape=}, {cu_q_lens.shape=}")
    scale = float(q.shape[2] ** -0.5 if sm_scale is None else sm_scale)
    offset = jnp.asarray(page_offset, jnp.int32).reshape(1)
    args = (q.astype(jnp.float32), k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, offset)

    def reference(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, offset):
        return ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_indices + offset[0], cu_q_lens,
                                                num_seqs, sm_scale=scale,
                                                max_kv_tokens=max_kv_tokens).astype(jnp.float32)

    return _run(RAGGED_TARGET, args, reference, scale, isa)


def tree_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                   page_indices: jax.Array, tree_mask: jax.Array, page_offset: jax.Array | int = 0, *,
                   sm_scale: float | None = None, max_kv_tokens: int | None = None,
                   isa: str = "auto") -> jax.Array:
    """Tree attention (speculative verification): q [B, N, H, D] -> [B, N, H, D] float32, the contract of
    ``tree_attention_reference`` (pallas_kernels/tree_attention.py): node i of request b sees the committed
    slots below kv_lens[b] and the tree slots kv_lens[b] + j of its ancestors-or-self (tree_mask [B, N, N]).

    The kernel runs each node as the decode row it becomes once its path is committed, so its output is
    bit for bit what ``paged_decode_attention`` gives for that token: verification accepts exactly the
    tokens plain decoding would produce. ``max_kv_tokens`` only sizes the reference's gather; other
    arguments as in ``paged_decode_attention``.
    """
    if q.ndim != 4:
        raise ValueError(f"expected q [B, N, H, D], got {q.shape=}")
    num_reqs, num_nodes = q.shape[:2]
    _check(q.reshape(num_reqs * num_nodes, *q.shape[2:]), k_pages, v_pages, page_indices, isa)
    if kv_lens.shape != (num_reqs,) or page_indices.shape[0] != num_reqs \
            or tree_mask.shape != (num_reqs, num_nodes, num_nodes):
        raise ValueError(f"expected kv_lens [B], page_indices [B, Pmax], tree_mask [B, N, N] for {q.shape=}, got "
                         f"{kv_lens.shape=}, {page_indices.shape=}, {tree_mask.shape=}")
    scale = float(q.shape[3] ** -0.5 if sm_scale is None else sm_scale)
    offset = jnp.asarray(page_offset, jnp.int32).reshape(1)
    rows = q.astype(jnp.float32).reshape(num_reqs * num_nodes, *q.shape[2:])  # the kernel's node rows
    args = (rows, k_pages, v_pages, kv_lens, page_indices, tree_mask, offset)

    def reference(rows, k_pages, v_pages, kv_lens, page_indices, tree_mask, offset):
        out = tree_attention_reference(rows.reshape(q.shape), k_pages, v_pages, kv_lens, page_indices + offset[0],
                                       tree_mask, sm_scale=scale, max_kv_tokens=max_kv_tokens)
        return out.reshape(rows.shape)

    return _run(TREE_TARGET, args, reference, scale, isa).reshape(q.shape)
