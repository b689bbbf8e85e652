"""Model registry: architecture name -> NNX model class, and model construction helpers.

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
from jaxinfer.models.llama import LlamaForCausalLM, param_path

# Qwen2 is the Llama block with q/k/v bias, which ModelConfig.attention_bias switches on.
MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM}

ParamPath = tuple[str | int, ...]


def _abstract_split(config: ModelConfig, dtype):
    cls = MODEL_CLASSES[config.architecture]
    return nnx.split(nnx.eval_shape(lambda: cls(config, dtype=dtype)))


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Every parameter's path in the NNX state and its shape/dtype (nothing allocated)."""
    _, state = _abstract_split(config, dtype)
    return {path: jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype))
            for path, leaf in nnx.to_flat_state(state)}


def model_from_values(config: ModelConfig, values: Mapping[ParamPath, jax.Array], dtype=jnp.float32) -> nnx.Module:
    """Build the model from a value for every parameter path (see ``param_shapes``)."""
    graphdef, state = _abstract_split(config, dtype)
    pure = nnx.to_pure_dict(state)
    for path, _ in nnx.to_flat_state(state):
        if path not in values:
            raise ValueError(f"no value for parameter {'.'.join(map(str, path))}")
        node = pure
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = jnp.asarray(values[path], dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def model_from_tensors(config: ModelConfig, tensors, dtype=jnp.float32) -> nnx.Module:
    """Build a model from (Hugging Face name, array) pairs with [out, in] linear weights.

    Raises ValueError naming a missing, unexpected or mis-shaped tensor.
    """
    shapes = param_shapes(config, dtype)
    pieces: dict[ParamPath, dict[int | None, np.ndarray]] = {}
    for name, array in tensors:
        if (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq"):
            continue
        path, transpose, part = param_path(name)
        if path not in shapes or part in pieces.get(path, {}):
            raise ValueError(f"unexpected tensor {name!r} for architecture {config.architecture}")
        pieces.setdefault(path, {})[part] = np.asarray(array).T if transpose else np.asarray(array)
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
            value = np.concatenate([parts[i] for i in range(expected_parts)], axis=-1)
        if value.shape != shape.shape:
            raise ValueError(f"tensor for {'.'.join(map(str, path))} has shape {value.shape}, expected {shape.shape}")
        values[path] = jnp.asarray(value, dtype)
    return model_from_values(config, values, dtype)


def init_random(config: ModelConfig, seed: int = 0, dtype=jnp.float32, scale: float = 0.5) -> nnx.Module:
    """A model with random weights (tests, benchmarks): normal(0, scale/sqrt(fan_in)), norms ~1."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, leaf in param_shapes(config, dtype).items():
        shape = leaf.shape
        if path[-1] == "weight":  # RMSNorm
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif path[-1] == "bias":
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = scale * rng.standard_normal(shape) / np.sqrt(shape[0] if path[-1] == "kernel" else shape[1])
        values[path] = value
    return model_from_values(config, values, dtype)
