"""Projections: dense ``Linear`` with an [in, out] kernel, and ``QuantLinear`` over GGUF-style
block-quantized rows (uint8 [out, in / 32 * block bytes]) run by the CPU kernels of
``jaxinfer.layers.quant`` (dequantize + dot on GPU/TPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.layers import quant


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a model's weights are quantized: ``linear`` for every decoder projection, ``embed`` for the
    token embedding (and the tied head, which reads the same rows); ``activations``: 'int8' rounds
    each 32-block of a matmul's input to int8 as llama.cpp does (the fast CPU path), 'float32' keeps
    them exact (weight-only quantization)."""

    linear: str = "q8_0"
    embed: str = "q8_0"
    activations: str = "int8"

    def __post_init__(self):
        for name in (self.linear, self.embed):
            if name not in quant.QTYPES:
                raise ValueError(f"unsupported quantization {name!r} (supported: {', '.join(quant.QTYPES)})")
        if self.activations not in ("int8", "float32"):
            raise ValueError(f"activations must be 'int8' or 'float32', got {self.activations!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). Inputs are cast to the kernel dtype, products accumulate in float32.

    Parameters are created zero-filled: real weights always come from a loader, random ones from
    ``jaxinfer.models.init_random``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: jnp.dtype = jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel,
                       preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y


class QuantLinear(nnx.Module):
    """y = x @ dequantize(qweight).T (+ bias), float32 out. ``qweight`` [out, in / 32 * block bytes]
    holds GGUF blocks of ``qtype`` row by row (the file's layout, read in place by the kernels)."""

    def __init__(self, in_features: int, out_features: int, *, qtype: str, bias: bool = False,
                 activations: str = "int8", dtype: jnp.dtype = jnp.float32):
        if in_features % quant.BLOCK:
            raise ValueError(f"quantized layers need in_features divisible by {quant.BLOCK}, got {in_features}")
        self.qweight = nnx.Param(jnp.zeros((out_features, quant.row_bytes(qtype, in_features)), jnp.uint8))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None
        self.qtype = qtype
        self.activations = activations

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("qlinear"):
            y = quant.qmatmul(x.astype(jnp.float32), self.qweight[...], self.qtype, activations=self.activations)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y


def make_linear(in_features: int, out_features: int, *, bias: bool = False, dtype: jnp.dtype = jnp.float32,
                quant_spec: QuantSpec | None = None) -> Linear | QuantLinear:
    """A decoder projection: quantized as ``quant_spec.linear`` says, else dense in ``dtype``."""
    if quant_spec is None:
        return Linear(in_features, out_features, bias=bias, dtype=dtype)
    return QuantLinear(in_features, out_features, qtype=quant_spec.linear, bias=bias,
                       activations=quant_spec.activations, dtype=dtype)
