"""Model registry: architecture name -> NNX model class, and model construction helpers.

Layer: above layers/ (whose attention metadata, KV pages and sampler the models use), below the
engine.

Axis letters used across models and kernels: B batch, T query tokens, S KV length, E hidden,
F feed-forward, V vocabulary, H query heads, K KV heads, D head_dim, L layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.layers import quant
from jaxinfer.layers.linear import QuantSpec
from jaxinfer.models.llama import LlamaForCausalLM, param_path

# Qwen2 is the Llama block with q/k/v bias, which ModelConfig.attention_bias switches on.
MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM}

ParamPath = tuple[str | int, ...]


def _abstract_split(config: ModelConfig, dtype, quant_spec: QuantSpec | None = None):
    cls = MODEL_CLASSES[config.architecture]
    return nnx.split(nnx.eval_shape(lambda: cls(config, dtype=dtype, quant_spec=quant_spec)))


def param_shapes(config: ModelConfig, dtype=jnp.float32,
                 quant_spec: QuantSpec | None = None) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Every parameter's path in the NNX state and its shape/dtype (nothing allocated): float
    parameters in ``dtype``, quantized blocks (``qweight``, a quantized ``embed_tokens``) uint8."""
    _, state = _abstract_split(config, dtype, quant_spec)
    return {path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for path, leaf in nnx.to_flat_state(state)}


def model_from_values(config: ModelConfig, values: Mapping[ParamPath, jax.Array], dtype=jnp.float32,
                      quant_spec: QuantSpec | None = None) -> nnx.Module:
    """Build the model from a value for every parameter path (see ``param_shapes``)."""
    graphdef, state = _abstract_split(config, dtype, quant_spec)
    pure = nnx.to_pure_dict(state)
    for path, leaf in nnx.to_flat_state(state):
        if path not in values:
            raise ValueError(f"no value for parameter {'.'.join(map(str, path))}")
        node = pure
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = jnp.asarray(values[path], leaf.dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _quantized_path(path: ParamPath, shapes: Mapping) -> ParamPath | None:
    """The ``qweight`` path standing for a dense ``kernel`` path in a quantized model, else None."""
    if path[-1] == "kernel" and path not in shapes and path[:-1] + ("qweight",) in shapes:
        return path[:-1] + ("qweight",)
    return None


def _target_qtype(path: ParamPath, quant_spec: QuantSpec) -> str:
    return quant_spec.embed if path[0] in ("embed_tokens", "lm_head") else quant_spec.linear


def _as_blocks(array, qtype: str) -> np.ndarray:
    """[out, in] weights (float array or quant.Blocks of any type) -> uint8 blocks of ``qtype``."""
    if isinstance(array, quant.Blocks) and array.qtype == qtype:
        return array.data
    return quant.quantize(_as_float(array), qtype)


def _as_float(array) -> np.ndarray:
    return array.dequantize() if isinstance(array, quant.Blocks) else np.asarray(array, np.float32)


def model_from_tensors(config: ModelConfig, tensors, dtype=jnp.float32,
                       quant_spec: QuantSpec | None = None) -> nnx.Module:
    """Build a model from (Hugging Face name, array) pairs with [out, in] linear weights; an array
    is a float array or ``quant.Blocks`` (GGUF blocks, kept as they are where ``quant_spec`` asks for
    that type, else dequantized and, for a quantized model, quantized to its type).

    Raises ValueError naming a missing, unexpected or mis-shaped tensor.
    """
    shapes = param_shapes(config, dtype, quant_spec)
    pieces: dict[ParamPath, dict[int | None, np.ndarray]] = {}
    for name, array in tensors:
        if (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq"):
            continue
        path, transpose, part = param_path(name)
        qpath = _quantized_path(path, shapes)
        if qpath is not None:
            path, value = qpath, _as_blocks(array, _target_qtype(path, quant_spec))
        elif path == ("embed_tokens",) and quant_spec is not None:
            value = _as_blocks(array, quant_spec.embed)
        else:
            value = _as_float(array).T if transpose else _as_float(array)
        if path not in shapes or part in pieces.get(path, {}):
            raise ValueError(f"unexpected tensor {name!r} for architecture {config.architecture}")
        pieces.setdefault(path, {})[part] = value
    values: dict[ParamPath, jax.Array] = {}
    for path, shape in shapes.items():
        parts = pieces.get(path)
        if parts is None:
            raise ValueError(f"checkpoint lacks tensor for {'.'.join(map(str, path))}")
        if None in parts:
            value = parts[None]
        else:
            expected_parts = 3 if path[-2] == "qkv_proj" else 2
            if sorted(parts) != list(range(expected_parts)):
                raise ValueError(f"checkpoint lacks part of the fused {'.'.join(map(str, path))}")
            # dense kernels are [in, out]: parts side by side; quantized blocks are [out, bytes]: stacked
            value = np.concatenate([parts[i] for i in range(expected_parts)], axis=0 if path[-1] == "qweight" else -1)
        if value.shape != shape.shape:
            raise ValueError(f"tensor for {'.'.join(map(str, path))} has shape {value.shape}, expected {shape.shape}")
        values[path] = jnp.asarray(value, shape.dtype)
    return model_from_values(config, values, dtype, quant_spec)


def random_value(path: ParamPath, shape: tuple[int, ...], noise, scale: float = 0.5):
    """The random-weight rule, for standard-normal ``noise`` of ``shape`` (numpy or jax): RMSNorm weights
    near 1, small biases, other parameters normal(0, scale/sqrt(fan_in))."""
    if path[-1] == "weight":  # RMSNorm
        return 1.0 + 0.1 * noise
    if path[-1] == "bias":
        return 0.1 * noise
    return scale * noise / np.sqrt(shape[0] if path[-1] == "kernel" else shape[1])


def init_random(config: ModelConfig, seed: int = 0, dtype=jnp.float32, scale: float = 0.5,
                quant_spec: QuantSpec | None = None) -> nnx.Module:
    """A model with random weights (tests, benchmarks; ``random_value``'s rule, drawn in numpy).
    With ``quant_spec`` the same random weights (same seed) quantized to its block types."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, leaf in param_shapes(config, dtype).items():
        value = random_value(path, leaf.shape, rng.standard_normal(leaf.shape), scale)
        if quant_spec is not None and path[-1] == "kernel":
            path, value = path[:-1] + ("qweight",), quant.quantize(value.T.astype(np.float32),
                                                                   _target_qtype(path, quant_spec))
        elif quant_spec is not None and path == ("embed_tokens",):
            value = quant.quantize(value.astype(np.float32), quant_spec.embed)
        values[path] = value
    return model_from_values(config, values, dtype, quant_spec)
