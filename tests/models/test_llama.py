"""Llama-family model vs an independent float64 numpy forward, and paged decode vs full forward."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import RopeScaling
from jaxinfer.models import model_from_tensors
from tests.conftest import tiny_config
from tests.models import numpy_llama, paged

TOKENS = [5, 17, 99, 3, 64, 127, 0, 42, 8, 77, 31]

VARIANTS = {
    "llama-gqa2-tied": dict(),
    "mha-untied": dict(num_kv_heads=4, tie_word_embeddings=False),
    "gqa4": dict(num_kv_heads=1),
    "qwen2-bias": dict(architecture="qwen2", attention_bias=True, rope_theta=1e6),
    "llama3-scaling": dict(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
}


def _full_logits(model, cfg, tokens, dtype=jnp.float32):
    pages = paged.page_table(0, paged.MAX_PAGES_PER_SEQ)
    logits, _ = paged.prefill(model, paged.new_cache(cfg, dtype=dtype), [(tokens, 0, pages)])
    return logits


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
    got = _full_logits(model, cfg, TOKENS)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa2-tied", "qwen2-bias"])
def test_chunked_prefill_then_paged_decode_equals_full_forward(name):
    cfg = tiny_config(**VARIANTS[name])
    model = model_from_tensors(cfg, numpy_llama.random_tensors(cfg, seed=2).items())
    full = _full_logits(model, cfg, TOKENS)
    pages = paged.page_table(5, 4)
    kv = paged.new_cache(cfg)
    first, kv = paged.prefill(model, kv, [(TOKENS[:3], 0, pages)])
    second, kv = paged.prefill(model, kv, [(TOKENS[3:6], 3, pages)])
    steps = [first, second]
    for i in range(6, len(TOKENS)):
        logits, kv = paged.decode(model, kv, [(TOKENS[i], i, pages)])
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=1e-5, atol=1e-5)


def test_sequences_in_one_step_are_independent():
    """Two prompts in one prompt part and two decode rows beside a prompt chunk each equal the
    sequence run alone: tokens never attend across sequences or read another's pages."""
    cfg = tiny_config()
    model = model_from_tensors(cfg, numpy_llama.random_tensors(cfg, seed=3).items())
    other = [9, 8, 7, 6, 5, 4, 3]
    alone_a, alone_b = _full_logits(model, cfg, TOKENS), _full_logits(model, cfg, other)
    pages = paged.page_table(1, 6)
    pages_a, pages_b = pages[:3], pages[3:]
    kv = paged.new_cache(cfg)
    both, kv = paged.prefill(model, kv, [(TOKENS[:9], 0, pages_a), (other[:5], 0, pages_b)])
    np.testing.assert_allclose(both[:9], alone_a[:9], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[9:], alone_b[:5], rtol=1e-5, atol=1e-5)
    rows, kv = paged.decode(model, kv, [(TOKENS[9], 9, pages_a), (other[5], 5, pages_b)])
    np.testing.assert_allclose(rows, np.stack([alone_a[9], alone_b[5]]), rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_stay_close_to_float32():
    """bf16 keeps 8 significant bits (relative rounding <= 2**-9 ~ 0.2% per value). Through two
    layers of rounded weights, inputs and cache the logits drift by a few of those units: a 3%
    relative-L2 bound allows ~15x the single-rounding error and still fails on a real bug (a wrong
    head, mask or rope gives O(100%) error)."""
    cfg = tiny_config()
    tensors = numpy_llama.random_tensors(cfg, seed=4)
    f32 = _full_logits(model_from_tensors(cfg, tensors.items(), jnp.float32), cfg, TOKENS)
    logits16 = _full_logits(model_from_tensors(cfg, tensors.items(), jnp.bfloat16), cfg, TOKENS, jnp.bfloat16)
    rel = np.linalg.norm(np.asarray(logits16) - f32) / np.linalg.norm(f32)
    assert rel < 3e-2, rel
    assert (np.asarray(logits16).argmax(-1) == f32.argmax(-1)).mean() >= 0.9
