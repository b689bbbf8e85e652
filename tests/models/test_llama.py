"""Llama-family model vs an independent float64 numpy forward, and cached decode vs full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import RopeScaling
from jaxinfer.engine.kv_cache import KVCache
from jaxinfer.models import model_from_tensors
from tests.conftest import tiny_config
from tests.models import numpy_llama

TOKENS = [5, 17, 99, 3, 64, 127, 0, 42, 8, 77, 31]

VARIANTS = {
    "llama-gqa2-tied": dict(),
    "mha-untied": dict(num_kv_heads=4, tie_word_embeddings=False),
    "gqa4": dict(num_kv_heads=1),
    "qwen2-bias": dict(architecture="qwen2", attention_bias=True, rope_theta=1e6),
    "llama3-scaling": dict(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
}


def _full_logits(model, cfg, tokens, batch=1):
    ids = jnp.asarray([tokens] * batch, jnp.int32)
    kv = KVCache.init(cfg, batch, 32)
    logits, _ = model(ids, jnp.broadcast_to(jnp.arange(len(tokens)), ids.shape), kv)
    return np.asarray(logits)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_float64_numpy(name):
    cfg = tiny_config(**VARIANTS[name])
    tensors = numpy_llama.random_tensors(cfg, seed=1)
    model = model_from_tensors(cfg, tensors.items())
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = dict(factor=s.factor, low=s.low_freq_factor, high=s.high_freq_factor,
                       original=s.original_max_position)
    expected = numpy_llama.forward(tensors, cfg, TOKENS, rope_scaling=scaling)
    got = _full_logits(model, cfg, TOKENS)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa2-tied", "qwen2-bias"])
def test_prefill_then_cached_decode_equals_full_forward(name):
    cfg = tiny_config(**VARIANTS[name])
    model = model_from_tensors(cfg, numpy_llama.random_tensors(cfg, seed=2).items())
    full = _full_logits(model, cfg, TOKENS)[0]
    split = 4
    kv = KVCache.init(cfg, 1, 32)
    prefix = jnp.asarray([TOKENS[:split]], jnp.int32)
    logits, kv = model(prefix, jnp.arange(split)[None], kv)
    steps = [np.asarray(logits[0])]
    step = jax.jit(lambda tok, pos, kv: model(tok, pos, kv))
    for i in range(split, len(TOKENS)):
        logits, kv = step(jnp.asarray([[TOKENS[i]]], jnp.int32), jnp.asarray([[i]]), kv)
        steps.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=1e-5, atol=1e-5)


def test_logits_indices_select_rows_and_batch_rows_are_independent():
    cfg = tiny_config()
    model = model_from_tensors(cfg, numpy_llama.random_tensors(cfg, seed=3).items())
    full = _full_logits(model, cfg, TOKENS, batch=2)
    np.testing.assert_allclose(full[0], full[1], rtol=1e-6, atol=1e-6)
    ids = jnp.asarray([TOKENS, TOKENS], jnp.int32)
    logits, _ = model(ids, jnp.broadcast_to(jnp.arange(len(TOKENS)), ids.shape), KVCache.init(cfg, 2, 32),
                      logits_indices=jnp.asarray([[3], [10]]))
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[[0, 1], [3, 10]], rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_stay_close_to_float32():
    """bf16 keeps 8 significant bits (relative rounding <= 2**-9 ~ 0.2% per value). Through two
    layers of rounded weights, inputs and cache the logits drift by a few of those units: a 3%
    relative-L2 bound allows ~15x the single-rounding error and still fails on a real bug (a wrong
    head, mask or rope gives O(100%) error)."""
    cfg = tiny_config()
    tensors = numpy_llama.random_tensors(cfg, seed=4)
    f32 = _full_logits(model_from_tensors(cfg, tensors.items(), jnp.float32), cfg, TOKENS)
    model16 = model_from_tensors(cfg, tensors.items(), jnp.bfloat16)
    ids = jnp.asarray([TOKENS], jnp.int32)
    logits16, _ = model16(ids, jnp.arange(len(TOKENS))[None], KVCache.init(cfg, 1, 32, jnp.bfloat16))
    rel = np.linalg.norm(np.asarray(logits16) - f32) / np.linalg.norm(f32)
    assert rel < 3e-2, rel
    assert (np.asarray(logits16).argmax(-1) == f32.argmax(-1)).mean() >= 0.9
