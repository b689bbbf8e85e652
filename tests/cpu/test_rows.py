"""Row-wise CPU kernels (jaxinfer/cpu/rows.cc): RMSNorm and the rotary embedding equal float64 formulas,
give every row the same bits in a batch of any size (XLA's own code did not), serve vmapped callers, and
stay out of GPU/TPU lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.cpu import build, rows
from jaxinfer.layers.rotary import inverse_frequencies
from tests.lowering import lowered_text

needs_kernels = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable (no compiler?)")
INV_FREQ = inverse_frequencies(64, 10000.0, None)


def _rms64(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def _rotary64(x, positions):
    x = np.asarray(x, np.float64)
    # the angle rounded to float32 as the kernel (and the jnp formula) forms it, then cos and sin in float64
    angles = (np.asarray(positions, np.float32)[..., None] * INV_FREQ.astype(np.float32)).astype(np.float64)
    cos, sin = np.cos(angles)[..., None, :], np.sin(angles)[..., None, :]
    x1, x2 = x[..., :32], x[..., 32:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@needs_kernels
@pytest.mark.parametrize("width", [576, 50])  # a multiple of 16 lanes, and a tail
def test_rms_norm_matches_float64_and_every_row_is_batch_invariant(width):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, width)) * 3, jnp.float32)
    w = jnp.asarray(rng.normal(size=width), jnp.float32)
    norm = jax.jit(lambda x: rows.rms_norm(x, w, 1e-5))
    out = np.asarray(norm(x))
    np.testing.assert_allclose(out, _rms64(x, w, 1e-5), rtol=2e-6, atol=2e-6)
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(norm(x[i:i + 1]))[0], out[i])
    assert rows.RMS_NORM_TARGET in norm.lower(x).as_text()


@needs_kernels
def test_rotary_matches_float64_and_every_row_is_batch_invariant():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 5, 64)), jnp.float32)
    positions = jnp.asarray([0, 1, 7, 300, 301, 4095, 9000, 2], jnp.int32)
    rotate = jax.jit(lambda x, p: rows.rotary(x, p, INV_FREQ))
    out = np.asarray(rotate(x, positions))
    np.testing.assert_allclose(out, _rotary64(x, positions), rtol=1e-5, atol=1e-5)
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(rotate(x[i:i + 1], positions[i:i + 1]))[0], out[i])


@needs_kernels
def test_vmapped_callers():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 4, 2, 64)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 500, size=(3, 4)), jnp.int32)
    got = jax.jit(jax.vmap(lambda x, p: rows.rotary(x, p, INV_FREQ)))(x, positions)
    np.testing.assert_allclose(got, _rotary64(x, positions), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(rng.normal(size=64), jnp.float32)
    got = jax.jit(jax.vmap(lambda x: rows.rms_norm(x, w, 1e-6)))(x)
    np.testing.assert_allclose(got, _rms64(x, w, 1e-6), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gpu_and_tpu_lowering_has_no_custom_call(platform):
    x = jax.ShapeDtypeStruct((8, 5, 64), jnp.bfloat16)
    p = jax.ShapeDtypeStruct((8,), jnp.int32)
    w = jax.ShapeDtypeStruct((64,), jnp.bfloat16)
    fn = jax.jit(lambda x, p, w: rows.rms_norm(rows.rotary(x, p, INV_FREQ), w, 1e-5))
    assert "jaxinfer_" not in lowered_text(lambda: fn.trace(x, p, w), platform)


@needs_kernels
def test_gradients_follow_the_formulas():
    """The draft head trains through both ops: their derivatives are the jnp formulas'."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 3, 64)), jnp.float32)
    positions = jnp.asarray([0, 5, 17, 300], jnp.int32)
    w = jnp.asarray(rng.normal(size=64), jnp.float32)

    def loss(x, w, norm, rotate):
        return jnp.sum(jnp.sin(norm(rotate(x, positions, INV_FREQ), w, 1e-5)))

    got = jax.grad(loss, argnums=(0, 1))(x, w, rows.rms_norm, rows.rotary)
    want = jax.grad(loss, argnums=(0, 1))(x, w, rows._rms_norm_reference,
                                          lambda x, p, f: rows._rotary_reference(x, p, np.asarray(f, np.float32)))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
