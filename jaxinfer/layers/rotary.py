"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama) with Llama-3 scaling."""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxinfer.config import RopeScaling
from jaxinfer.cpu import rows


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """[D/2] float64 inverse frequencies theta^(-2i/D), rescaled per Llama 3 when ``scaling`` is set.

    Llama 3 keeps high frequencies (wavelength below original_max/high_freq_factor), divides low
    frequencies (wavelength above original_max/low_freq_factor) by ``factor`` and blends linearly
    in between.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    wavelength = 2 * math.pi / inv
    low_wavelength = scaling.original_max_position / scaling.low_freq_factor
    high_wavelength = scaling.original_max_position / scaling.high_freq_factor
    smooth = (scaling.original_max_position / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    return np.where(wavelength < high_wavelength, inv,
                    np.where(wavelength > low_wavelength, inv / scaling.factor, blended))


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` [..., T, N, D] by angles positions[..., T] * inv_freq[D/2]; float32 math (on CPU a
    kernel that gives every row the same bits whatever the batch: jaxinfer.cpu.rows)."""
    return rows.rotary(x, positions, inv_freq)
