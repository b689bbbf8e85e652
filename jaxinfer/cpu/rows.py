"""Row-wise ops on CPU that give every row the same bits whatever the batch (rows.cc): RMSNorm and the
rotary embedding. XLA's own CPU code for them changes with the array's shape, so a token's hidden state
differed by a few ulps between a step of one row and a step of several, enough (after the next matmul
rounds its activations to int8) to change greedy tokens: speculative verification, which runs a
request's draft nodes as several rows, could not reproduce plain decoding exactly.

Each op runs the kernel on CPU and its jnp formula elsewhere (``lax.platform_dependent``: GPU/TPU
lowering never sees the custom call) and where the kernels are unavailable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cpu import build

RMS_NORM_TARGET = "jaxinfer_rms_norm"
ROTARY_TARGET = "jaxinfer_rotary"


def _available() -> bool:
    """The kernels on a CPU host (GPU/TPU hosts never build them)."""
    return jax.default_backend() == "cpu" and build.load() is not None


def _rms_norm_reference(x32, w32, eps: float):
    variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(variance + eps) * w32


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _rms_norm(x32, w32, eps: float):
    def kernel(x32, w32):
        call = jax.ffi.ffi_call(RMS_NORM_TARGET, jax.ShapeDtypeStruct(x32.shape, jnp.float32),
                                vmap_method="expand_dims")
        return call(x32, w32, eps=np.float32(eps))

    return jax.lax.platform_dependent(x32, w32, cpu=kernel,
                                      default=functools.partial(_rms_norm_reference, eps=eps))


@_rms_norm.defjvp
def _rms_norm_jvp(eps, primals, tangents):  # training the draft head: the formula's derivative
    _, tangent = jax.jvp(functools.partial(_rms_norm_reference, eps=eps), primals, tangents)
    return _rms_norm(*primals, eps), tangent


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., E] -> float32 x / sqrt(mean(x^2) + eps) * weight, the math in float32."""
    x32, w32 = x.astype(jnp.float32), weight.astype(jnp.float32)
    if not _available():
        return _rms_norm_reference(x32, w32, eps)
    return _rms_norm(x32, w32, float(eps))


def _rotary_reference(x32, positions, freq: np.ndarray):
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freq)  # [..., T, D/2]
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
    half = x32.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _rotary(x32, positions, freq: tuple[float, ...]):  # freq: inv_freq as a hashable static argument
    inv_freq = np.asarray(freq, np.float32)

    def kernel(x32, positions):
        call = jax.ffi.ffi_call(ROTARY_TARGET, jax.ShapeDtypeStruct(x32.shape, jnp.float32), vmap_method="expand_dims")
        return call(x32, positions, inv_freq=inv_freq)

    return jax.lax.platform_dependent(x32, positions, cpu=kernel,
                                      default=functools.partial(_rotary_reference, freq=inv_freq))


@_rotary.defjvp
def _rotary_jvp(freq, primals, tangents):  # linear in x; positions are integers
    x32, positions = primals
    _, tangent = jax.jvp(lambda x: _rotary_reference(x, positions, np.asarray(freq, np.float32)), (x32,),
                         (tangents[0],))
    return _rotary(x32, positions, freq), tangent


def rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half rotary embedding of x [..., T, N, D] by positions [..., T] * inv_freq [D/2], float32
    math, returned in x's dtype."""
    x32, positions = x.astype(jnp.float32), positions.astype(jnp.int32)
    if not _available():
        return _rotary_reference(x32, positions, np.asarray(inv_freq, np.float32)).astype(x.dtype)
    return _rotary(x32, positions, tuple(np.asarray(inv_freq, np.float32).tolist())).astype(x.dtype)
