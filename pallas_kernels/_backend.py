"""Resolution of kernel dispatch (Pallas or reference, interpret mode or compiled) and the pieces the
kernels share: running a kernel built for Mosaic and Triton, and the online-softmax step.

Resolved once (when a model runner is built) and passed down as static configuration; model code
never inspects devices itself.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

IMPLS = ("auto", "pallas", "reference")


def resolve_interpret(interpret: bool | None = None) -> bool:
    """Interpret mode when asked, else from JAXINFER_PALLAS_INTERPRET=0/1, else on CPU only."""
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


def run_kernel(mosaic_call, triton_call, interpret):
    """Run a kernel built both ways: the Mosaic body in the TPU interpreter for InterpretParams, the
    Triton body in the generic interpreter for True, else compiled for whichever platform runs it."""
    if isinstance(interpret, pltpu.InterpretParams):
        return mosaic_call(interpret)
    if interpret:
        return triton_call(True)
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
