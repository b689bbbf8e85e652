"""UniSparse Pallas kernels (block-sparse attention, block scores) against the jnp references, in the
generic and TPU interpreters, and lowered for GPU and TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxinfer.config import UniSparseConfig
from pallas_kernels.unisparse.block_scores_kernel import block_scores_pallas
from pallas_kernels.unisparse.block_sparse_attention import block_sparse_attention, causal_block_lists
from pallas_kernels.unisparse.reference import (
    block_scores,
    block_sparse_attention_reference,
    select_blocks,
)
from tests.lowering import lowered_text

HEAD_DIM = 16

# name -> (block_size S, c_q, c_k, Tq, Tk, KV heads, group G, q_start, kv_len or None)
CASES = {
    "prompt_g1": (16, 4, 4, 64, 64, 2, 1, 0, None),
    "prompt_g3_s32": (32, 8, 4, 128, 128, 1, 3, 0, None),
    "chunk_g3": (16, 4, 8, 48, 112, 2, 3, 64, None),
    "chunk_kv_len_s32": (32, 4, 8, 64, 192, 1, 2, 96, 120),  # query block 4 lies wholly past kv_len
}


def _qkv(num_q, num_k, num_kv_heads, group, *, head_dim=HEAD_DIM, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(num_q, num_kv_heads * group, head_dim))
    k = rng.normal(size=(num_k, num_kv_heads, head_dim))
    v = rng.normal(size=(num_k, num_kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _case(name, *, dtype=jnp.float32, seed=0, tau=0.6):
    block_size, c_q, c_k, num_q, num_k, num_kv_heads, group, q_start, kv_len = CASES[name]
    config = UniSparseConfig(local_blocks=1, c_h=1, block_size=block_size, c_q=c_q, c_k=c_k, tau=tau)
    q, k, v = _qkv(num_q, num_k, num_kv_heads, group, dtype=dtype, seed=seed)
    mask, indices, counts = select_blocks(block_scores(q, k, config, q_start, kv_len), config, q_start)
    return config, (q, k, v), (mask, indices, counts), q_start, kv_len


def _numpy_attention(q, k, v, mask, block_size, q_start, kv_len):
    """float64 causal attention masked to the kept blocks and to keys before kv_len; rows that see
    nothing are zero."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[2])
    key_pos, query_pos = np.arange(k.shape[0]), q_start + np.arange(q.shape[0])
    allowed = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] < kv_len)
    allowed = allowed[None] & np.repeat(np.repeat(np.asarray(mask), block_size, 1), block_size, 2)
    probs = np.where(allowed, np.exp(logits - np.where(allowed, logits, -np.inf).max(-1, keepdims=True)), 0.0)
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)
    return np.einsum("hts,shd->thd", probs, v)


# --- block-sparse attention ---

@pytest.mark.parametrize("name", list(CASES))
def test_block_sparse_attention_interpret_matches_reference(name):
    config, (q, k, v), (mask, indices, counts), q_start, kv_len = _case(name, seed=1)
    causal_blocks = np.tril(np.ones(mask.shape[1:], bool), q_start // config.block_size).sum()
    assert int(mask.sum()) < mask.shape[0] * causal_blocks  # the selection really drops blocks
    out = block_sparse_attention(q, k, v, indices, counts, block_size=config.block_size, q_start=q_start,
                                 kv_len=kv_len, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    if kv_len is None:
        expected = block_sparse_attention_reference(q, k, v, mask, config.block_size, q_start)
    else:
        expected = _numpy_attention(q, k, v, mask, config.block_size, q_start, kv_len)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_block_sparse_attention_traced_bounds_sm_scale_and_bfloat16(monkeypatch):
    monkeypatch.delenv("JAXINFER_PALLAS_INTERPRET", raising=False)
    config, (q, k, v), (mask, indices, counts), q_start, kv_len = _case("chunk_kv_len_s32", seed=2)

    @jax.jit
    def run(q, k, v, q_start, kv_len):  # q_start and kv_len traced; interpret=None resolves on CPU
        return block_sparse_attention(q, k, v, indices, counts, block_size=config.block_size, q_start=q_start,
                                      kv_len=kv_len, sm_scale=0.5 * HEAD_DIM ** -0.5)

    expected = _numpy_attention(0.5 * q, k, v, mask, config.block_size, q_start, kv_len)
    np.testing.assert_allclose(run(q, k, v, q_start, kv_len), expected, atol=1e-5, rtol=1e-5)
    half = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    out = run(*half, q_start, kv_len)
    assert out.dtype == jnp.bfloat16
    expected = _numpy_attention(0.5 * half[0].astype(jnp.float32), *half[1:], mask, config.block_size, q_start,
                                kv_len)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", ["chunk_g3", "chunk_kv_len_s32"])
def test_block_sparse_attention_mosaic_body_in_tpu_interpreter(name):
    # The TPU body (scalar prefetch into SMEM, double-buffered block DMAs) in the TPU interpreter;
    # "eager" DMAs catch a prefetch that overwrites a buffer still in use.
    config, (q, k, v), (mask, indices, counts), q_start, kv_len = _case(name, seed=3)
    params = pltpu.InterpretParams(dma_execution_mode="eager")
    out = block_sparse_attention(q, k, v, indices, counts, block_size=config.block_size, q_start=q_start,
                                 kv_len=kv_len, interpret=params)
    expected = _numpy_attention(q, k, v, mask, config.block_size, q_start, k.shape[0] if kv_len is None else kv_len)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_causal_block_lists():
    indices, counts = causal_block_lists(2, 3, 5, 1)
    assert indices.dtype == counts.dtype == jnp.int32
    np.testing.assert_array_equal(counts, [[2, 3, 4]] * 2)
    np.testing.assert_array_equal(indices[1], [[0, 1, 1, 1, 1], [0, 1, 2, 2, 2], [0, 1, 2, 3, 3]])
    indices, counts = causal_block_lists(1, 2, 2, 1)  # clipped to Nk blocks
    np.testing.assert_array_equal(counts, [[2, 2]])
    np.testing.assert_array_equal(indices[0], [[0, 1], [0, 1]])


@pytest.mark.parametrize("q_start", [0, 32])
def test_dense_block_lists_match_dense_reference(q_start):
    # Every causal block kept: the kernel is the dense blocked flash kernel.
    block_size = 16
    q, k, v = _qkv(32, 64, 2, 3, seed=4)
    num_q_blocks, num_k_blocks = q.shape[0] // block_size, k.shape[0] // block_size
    indices, counts = causal_block_lists(q.shape[1], num_q_blocks, num_k_blocks, q_start // block_size)
    out = block_sparse_attention(q, k, v, indices, counts, block_size=block_size, q_start=q_start, interpret=True)
    everything = jnp.ones((q.shape[1], num_q_blocks, num_k_blocks), bool)
    expected = block_sparse_attention_reference(q, k, v, everything, block_size, q_start)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


# --- block scores ---

@pytest.mark.parametrize("name", list(CASES))
def test_block_scores_interpret_matches_reference(name):
    block_size, c_q, c_k, num_q, num_k, num_kv_heads, group, q_start, kv_len = CASES[name]
    config = UniSparseConfig(local_blocks=1, c_h=1, block_size=block_size, c_q=c_q, c_k=c_k)
    q, k, _ = _qkv(num_q, num_k, num_kv_heads, group, seed=5)
    out = block_scores_pallas(q, k, config, q_start, kv_len, interpret=True)
    assert out.dtype == jnp.float32 and out.shape == (q.shape[1], num_q // block_size, num_k // block_size)
    np.testing.assert_allclose(out, block_scores(q, k, config, q_start, kv_len), atol=1e-5, rtol=1e-5)


def test_block_scores_many_chunks_odd_blocks_bfloat16_and_traced_bounds():
    # Nk = 36 key blocks (3 chunks of 16), S / c_k = 3 composite keys per block (padded to 4), head_dim 8.
    config = UniSparseConfig(local_blocks=1, c_h=1, block_size=12, c_q=4, c_k=4)
    q, k, _ = _qkv(24, 432, 1, 2, head_dim=8, dtype=jnp.bfloat16, seed=6)
    run = jax.jit(lambda q, k, q_start, kv_len: block_scores_pallas(q, k, config, q_start, kv_len, interpret=True))
    for q_start, kv_len in ((396, 432), (204, 215)):
        out = run(q, k, q_start, kv_len)
        expected = block_scores(q, k, config, q_start, kv_len)  # pools in f32 as the kernel does
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
        assert not np.any(np.asarray(out)[:, :, -(-kv_len // 12):])


def test_block_scores_mosaic_call_in_tpu_interpreter():
    block_size, c_q, c_k, num_q, num_k, num_kv_heads, group, q_start, kv_len = CASES["chunk_kv_len_s32"]
    config = UniSparseConfig(local_blocks=1, c_h=1, block_size=block_size, c_q=c_q, c_k=c_k)
    q, k, _ = _qkv(num_q, num_k, num_kv_heads, group, seed=7)
    out = block_scores_pallas(q, k, config, q_start, kv_len, interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(out, block_scores(q, k, config, q_start, kv_len), atol=1e-5, rtol=1e-5)


# --- lowering and validation ---

def _abstract(num_tokens, num_heads, dtype):
    return jax.ShapeDtypeStruct((num_tokens, num_heads, 64), dtype)


@pytest.mark.parametrize("platform,target", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_gpu_and_tpu(platform, target, dtype):
    # SmolLM2-135M-like heads (9 query, 3 KV, head_dim 64); a 256-token chunk at traced q_start of 1536 keys.
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    q, k = _abstract(256, 9, dtype), _abstract(1536, 3, dtype)
    lists = (jax.ShapeDtypeStruct((9, 4, 24), jnp.int32), jax.ShapeDtypeStruct((9, 4), jnp.int32))
    attention = jax.jit(functools.partial(block_sparse_attention, block_size=64, interpret=False))
    text = lowered_text(lambda: attention.trace(q, k, k, *lists, q_start=scalar, kv_len=scalar), platform)
    assert target in text and "block_sparse_attention_s64" in text
    config = UniSparseConfig(local_blocks=1, c_h=1, block_size=64, c_q=8, c_k=8)
    scores = jax.jit(functools.partial(block_scores_pallas, config=config, interpret=False))
    text = lowered_text(lambda: scores.trace(q, k, q_start=scalar, kv_len=scalar), platform)
    assert target in text and "block_scores_s64_cq8_ck8" in text


def _attention_args():
    q, k, v = _qkv(32, 64, 2, 2)
    indices, counts = causal_block_lists(4, 2, 4, 2)
    return dict(q=q, k=k, v=v, indices=indices, counts=counts)


@pytest.mark.parametrize("change,match", [
    (lambda a: dict(q=a["q"][0]), r"q.shape=\(4, 16\)"),
    (lambda a: dict(v=a["v"][:, :1]), r"v.shape=\(64, 1, 16\)"),
    (lambda a: dict(q=a["q"][:, :3]), "K dividing H"),
    (lambda a: dict(q=a["q"][:24]), r"multiples of block_size=16"),
    (lambda a: dict(k=a["k"].astype(jnp.bfloat16)), r"k.dtype=dtype\(bfloat16\)"),
    (lambda a: dict(q=a["q"].astype(jnp.int32)), r"q.dtype=dtype\('int32'\)"),
    (lambda a: dict(indices=a["indices"][:, :, :3]), r"indices.shape=\(4, 2, 3\)"),
    (lambda a: dict(counts=a["counts"][:1]), r"counts.shape=\(1, 2\)"),
    (lambda a: dict(counts=a["counts"].astype(jnp.int16)), "indices and counts must be int32"),
])
def test_block_sparse_attention_rejects_bad_inputs(change, match):
    args = _attention_args()
    args.update(change(args))
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(**args, block_size=16, interpret=True)


def test_compiled_kernels_reject_tiles_triton_cannot_dot():
    args = _attention_args()
    args["indices"], args["counts"] = causal_block_lists(4, 4, 8, 4)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        block_sparse_attention(**args, block_size=8, interpret=False)
    q, k, _ = _qkv(32, 64, 2, 2)
    with pytest.raises(ValueError, match="multiples of block_size"):
        block_scores_pallas(q[:24], k, UniSparseConfig(local_blocks=1, c_h=1, block_size=16, c_q=4, c_k=4),
                            interpret=True)
