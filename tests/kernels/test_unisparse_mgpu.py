"""The Mosaic GPU body of block-sparse attention: equal to the Triton-style body (itself checked against
float64 loops) in the Mosaic GPU interpreter (jax >= 0.11), lowered for cuda under every jax, and chosen
only where asked and where it serves the shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import UniSparseConfig
from pallas_kernels import resolve_gpu_body
from pallas_kernels._mgpu import interpret_params
from pallas_kernels.unisparse.block_sparse_attention import block_sparse_attention
from pallas_kernels.unisparse.block_sparse_attention_mgpu import supported
from pallas_kernels.unisparse.reference import block_scores, select_blocks
from tests.lowering import lowered_text

S = 64  # the body's tile edge


def _case(num_q, num_k, q_start, kv_len, *, group=2, head_dim=64, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(num_q, 2 * group, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(num_k, 2, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(num_k, 2, head_dim)), dtype)
    config = UniSparseConfig(local_blocks=1, c_h=1, block_size=S, c_q=4, c_k=4, tau=0.5)
    _, indices, counts = select_blocks(block_scores(q, k, config, q_start, kv_len), config, q_start)
    return (q, k, v, indices, counts), dict(block_size=S, q_start=q_start, kv_len=kv_len)


@pytest.mark.skipif(interpret_params() is None, reason="this jax has no Mosaic GPU interpreter (jax >= 0.11)")
@pytest.mark.parametrize("num_q, num_k, q_start, kv_len, group", [
    (256, 256, 0, None, 2),  # a whole prompt
    (128, 384, 256, 350, 3),  # a chunk at an offset, keys cut at kv_len inside a block
])
def test_interpreted_body_equals_the_triton_style_body(num_q, num_k, q_start, kv_len, group):
    args, kwargs = _case(num_q, num_k, q_start, kv_len, group=group)
    want = block_sparse_attention(*args, **kwargs, interpret=True)
    got = block_sparse_attention(*args, **kwargs, interpret=interpret_params())
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("body, target", [("mosaic", "mosaic_gpu"), ("triton", "__gpu$xla.gpu.triton")])
def test_lowers_for_cuda_with_the_chosen_body(body, target):
    args, kwargs = _case(256, 256, 0, None)
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    fn = jax.jit(functools.partial(block_sparse_attention, **kwargs, interpret=False, gpu_body=body))
    text = lowered_text(lambda: fn.trace(*abstract), "cuda")
    assert target in text


def test_body_choice():
    assert supported(jnp.bfloat16, jnp.bfloat16, 64, 128) and supported(jnp.float16, jnp.float16, 128, 64)
    assert not supported(jnp.float32, jnp.float32, 64, 64)  # wgmma here takes 16-bit operands
    assert not supported(jnp.bfloat16, jnp.bfloat16, 32, 64) and not supported(jnp.bfloat16, jnp.float16, 64, 64)
    assert resolve_gpu_body() == "triton" and resolve_gpu_body("mosaic") == "mosaic"
    with pytest.raises(ValueError, match="GPU kernel body"):
        resolve_gpu_body("cuda")
