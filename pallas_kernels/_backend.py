"""Resolution of kernel dispatch (Pallas or reference, interpret mode or compiled) and the pieces the
kernels share: running a kernel built for Mosaic and Triton, and the online-softmax step.

Resolved once (when a model runner is built) and passed down as static configuration; model code
never inspects devices itself.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

IMPLS = ("auto", "pallas", "reference")


def resolve_interpret(interpret=None):
    """Interpret mode when asked, else from JAXINFER_PALLAS_INTERPRET=0/1, else on CPU only. An
    interpreter's parameters (``pltpu.InterpretParams``, ``plgpu.InterpretGPUParams``) pass through."""
    if isinstance(interpret, pltpu.InterpretParams) or is_mosaic_gpu_interpret(interpret):
        return interpret
    if interpret is not None:
        return bool(interpret)
    env = os.environ.get("JAXINFER_PALLAS_INTERPRET")
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"JAXINFER_PALLAS_INTERPRET must be 0 or 1, got {env!r}")
        return env == "1"
    return jax.default_backend() == "cpu"


def resolve_impl(impl: str = "auto") -> str:
    """'auto' -> 'pallas' on GPU/TPU and 'reference' on CPU (interpret mode is for tests, not speed)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r} (choose from {', '.join(IMPLS)})")
    if impl != "auto":
        return impl
    return "reference" if jax.default_backend() == "cpu" else "pallas"


GPU_BODIES = ("triton", "mosaic")


def resolve_gpu_body(body: str | None = None) -> str:
    """Which body a kernel that has both runs on a GPU: ``body``, else JAXINFER_GPU_BODY, else triton
    (the Mosaic GPU bodies have not run compiled on a GPU yet)."""
    body = body or os.environ.get("JAXINFER_GPU_BODY") or "triton"
    if body not in GPU_BODIES:
        raise ValueError(f"GPU kernel body must be one of {', '.join(GPU_BODIES)}, got {body!r}")
    return body


def is_mosaic_gpu_interpret(interpret) -> bool:
    """``interpret`` asks for the Mosaic GPU interpreter (jax >= 0.11)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    return params is not None and isinstance(interpret, params)


def use_mosaic_gpu(interpret, gpu_body: str | None, supported: bool, needs: str) -> bool:
    """Whether a kernel runs its Mosaic GPU body: in that body's interpreter, or compiled where ``gpu_body``
    (default JAXINFER_GPU_BODY) asks for it and the shapes suit it (``supported``, else the Triton body
    runs). The interpreter with shapes the body cannot serve is an error naming what it ``needs``."""
    interpreted = is_mosaic_gpu_interpret(interpret)
    if interpreted and not supported:
        raise ValueError(f"the Mosaic GPU body needs {needs}")
    return (resolve_gpu_body(gpu_body) == "mosaic" or interpreted) and supported


def run_kernel(mosaic_call, triton_call, interpret, mosaic_gpu_call=None):
    """Run a kernel built several ways: the Mosaic body in the TPU interpreter for InterpretParams, the
    Mosaic GPU body in its interpreter for InterpretGPUParams, the Triton body in the generic
    interpreter for True, else compiled for whichever platform runs it (on cuda the Mosaic GPU body
    when one is given, else Triton)."""
    if isinstance(interpret, pltpu.InterpretParams):
        return mosaic_call(interpret)
    if is_mosaic_gpu_interpret(interpret):
        return mosaic_gpu_call(interpret)
    if interpret:
        return triton_call(True)
    if mosaic_gpu_call is not None:
        return lax.platform_dependent(tpu=lambda: mosaic_call(False), cuda=lambda: mosaic_gpu_call(None),
                                      default=lambda: triton_call(False))
    return lax.platform_dependent(tpu=lambda: mosaic_call(False), default=lambda: triton_call(False))


def online_softmax_step(carry, scores, visible, values, mask_value: float):
    """One flash-attention step inside a kernel: fold scores [R, L] (masked by visible) and values [L, D]
    into the running max, sum and f32 accumulator (m [R, 1], l [R, 1], acc [R, D])."""
    m_prev, l_prev, acc_prev = carry
    scores = jnp.where(visible, scores, mask_value)
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    # Zeroing masked probabilities keeps rows that see nothing yet (m still mask_value) at zero.
    probs = jnp.where(visible, jnp.exp(scores - m_next), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(probs, axis=1, keepdims=True)
    acc_next = alpha * acc_prev + jnp.dot(probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return m_next, l_next, acc_next


def paged_kv_loader(scratch, k_pages_ref, v_pages_ref, page_indices_ref, kv_head, first_page, pages_per_block: int,
                    num_steps):
    """load_kv(step) -> (k, v) [pages_per_block * L, D]: the pages page_indices_ref[first_page(step) + i].

    Mosaic (scratch = k_buf, v_buf, sems): the pools stay in HBM; step s's pages are DMA'd into
    buffer slot s % 2 while step s - 1 computes on the other slot (the first fetch starts here).
    Triton and the generic interpreter (no scratch): the step's pages are gathered from the pool."""
    page_size, head_dim = v_pages_ref.shape[-2], v_pages_ref.shape[-1]
    kv_block = pages_per_block * page_size
    if not scratch:
        def gather(step):
            pages = page_indices_ref[pl.ds(first_page(step), pages_per_block)]
            return k_pages_ref[pages].reshape(kv_block, head_dim), v_pages_ref[pages].reshape(kv_block, head_dim)
        return gather
    k_buf, v_buf, sems = scratch

    def copies(step):
        slot = lax.rem(step, 2)
        for i in range(pages_per_block):
            page = page_indices_ref[first_page(step) + i]
            for which, (pool, buf) in enumerate(((k_pages_ref, k_buf), (v_pages_ref, v_buf))):
                yield pltpu.make_async_copy(pool.at[kv_head, page], buf.at[slot, pl.ds(i * page_size, page_size)],
                                            sems.at[which, slot])

    def start_fetch(step):
        for copy in copies(step):
            copy.start()

    pl.when(num_steps > 0)(functools.partial(start_fetch, 0))

    def load(step):
        for copy in copies(step):
            copy.wait()
        pl.when(step + 1 < num_steps)(functools.partial(start_fetch, step + 1))
        slot = lax.rem(step, 2)
        return k_buf[slot], v_buf[slot]

    return load
