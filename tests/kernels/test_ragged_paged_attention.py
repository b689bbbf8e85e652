"""Ragged paged attention: reference vs a float64 numpy loop, Pallas kernel vs reference, lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import (
    BlockSizes,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from tests.lowering import lowered_text

PAGE = 8  # page size of the interpret-mode cases
NUM_KV_HEADS = 2
HEAD_DIM = 16

# name -> (q_lens, kv_lens, max_num_seqs B, num_tokens T); B > len(q_lens) adds padding sequences and
# T > sum(q_lens) adds padding rows. Lengths cover 1, page-1, page, page+1 and several pages.
CASES = {
    "decode": ([1, 1, 1, 1, 1], [1, PAGE - 1, PAGE, PAGE + 1, 4 * PAGE + 3], 6, 6),
    "prefill": ([PAGE + 1, 5, 2 * PAGE + 3], [PAGE + 1, 5 + 2 * PAGE, 2 * PAGE + 3], 3, 36),
    "mixed": ([1, 3, 0, 1, PAGE + 1, 2], [PAGE - 1, 3, 5, 4 * PAGE + 3, 2 * PAGE, 2], 8, 20),
}


def _make_inputs(q_lens, kv_lens, max_num_seqs, num_tokens, *, group, head_dim=HEAD_DIM, page_size=PAGE,
                 num_kv_heads=NUM_KV_HEADS, dtype=jnp.float32, seed=0):
    """Unit-norm-ish q/k, shuffled page tables (one spare column), padding sequences and rows."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    pages_per_seq = -(-max(kv_lens) // page_size) + 1
    num_pages = max_num_seqs * pages_per_seq + 3
    num_heads = num_kv_heads * group
    q = rng.normal(size=(num_tokens, num_heads, head_dim)) / np.sqrt(head_dim)
    k_pages = rng.normal(size=(num_kv_heads, num_pages, page_size, head_dim)) / np.sqrt(head_dim)
    v_pages = rng.normal(size=(num_kv_heads, num_pages, page_size, head_dim))
    page_indices = rng.permutation(num_pages)[:max_num_seqs * pages_per_seq].reshape(max_num_seqs, pages_per_seq)
    kv = np.zeros(max_num_seqs, np.int32)
    kv[:num_seqs] = kv_lens
    cu = np.zeros(max_num_seqs + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(kv),
            jnp.asarray(page_indices, jnp.int32), jnp.asarray(cu), jnp.asarray([num_seqs], jnp.int32))


def _case(name, group, **kwargs):
    return _make_inputs(*CASES[name], group=group, **kwargs)


def _numpy_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=None):
    """Independent float64 loop over sequences, query rows and heads, straight from the contract."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    kv_lens, page_indices, cu_q_lens = (np.asarray(x) for x in (kv_lens, page_indices, cu_q_lens))
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for b in range(int(num_seqs[0])):
        first, last, kv_len = int(cu_q_lens[b]), int(cu_q_lens[b + 1]), int(kv_lens[b])
        pages = [page_indices[b, s // page_size] for s in range(kv_len)]
        offsets = [s % page_size for s in range(kv_len)]
        keys = k_pages[:, pages, offsets]  # [K, S, D]
        values = v_pages[:, pages, offsets]
        for i, row in enumerate(range(first, last)):
            position = kv_len - (last - first) + i
            for h in range(num_heads):
                scores = keys[h // group, :position + 1] @ q[row, h] * scale
                probs = np.exp(scores - scores.max())
                out[row, h] = probs @ values[h // group, :position + 1] / probs.sum()
    return out


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_numpy_loop(name, group):
    args = _case(name, group, seed=group)
    expected = _numpy_attention(*args)
    np.testing.assert_allclose(ragged_paged_attention_reference(*args), expected, atol=2e-5, rtol=1e-5)
    q_lens, kv_lens, _, _ = CASES[name]
    hinted = ragged_paged_attention_reference(*args, max_kv_tokens=sum(kv_lens))
    np.testing.assert_allclose(hinted, expected, atol=2e-5, rtol=1e-5)
    if max(q_lens) == 1:
        decode = ragged_paged_attention_reference(*args, max_q_len=1)
        np.testing.assert_allclose(decode, expected, atol=2e-5, rtol=1e-5)


def test_reference_sm_scale_and_zero_padding_rows():
    args = _case("mixed", 2)
    expected = _numpy_attention(*args, sm_scale=0.3)
    out = ragged_paged_attention_reference(*args, sm_scale=0.3)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    num_real = sum(CASES["mixed"][0])
    assert num_real < out.shape[0] and not np.any(np.asarray(out[num_real:]))


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_interpret_matches_reference(name, group):
    args = _case(name, group, seed=10 + group)
    out = ragged_paged_attention(*args, interpret=True)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    np.testing.assert_allclose(out, ragged_paged_attention_reference(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_sizes", [BlockSizes(block_q=1, pages_per_block=1),
                                         BlockSizes(block_q=4, pages_per_block=2),
                                         BlockSizes(block_q=2, pages_per_block=8)])
def test_kernel_block_sizes_and_sm_scale(block_sizes):
    args = _case("mixed", 3, seed=20)
    out = ragged_paged_attention(*args, sm_scale=0.3, block_sizes=block_sizes, interpret=True)
    np.testing.assert_allclose(out, ragged_paged_attention_reference(*args, sm_scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,group", [("mixed", 3), ("decode", 2)])
def test_kernel_mosaic_body_in_tpu_interpreter(name, group):
    # The TPU body (scalar prefetch into SMEM, double-buffered page DMAs) run by the TPU interpreter;
    # "eager" DMAs catch a prefetch that overwrites a buffer still in use.
    args = _case(name, group, seed=30)
    params = pltpu.InterpretParams(dma_execution_mode="eager")
    out = ragged_paged_attention(*args, block_sizes=BlockSizes(block_q=4, pages_per_block=1), interpret=params)
    np.testing.assert_allclose(out, ragged_paged_attention_reference(*args), atol=1e-5, rtol=1e-5)


def test_kernel_bfloat16_and_default_interpret(monkeypatch):
    monkeypatch.delenv("JAXINFER_PALLAS_INTERPRET", raising=False)
    args = _case("mixed", 2, dtype=jnp.bfloat16, seed=40)
    out = ragged_paged_attention(*args)  # interpret=None resolves to interpret mode on CPU
    assert out.dtype == jnp.bfloat16
    expected = _numpy_attention(*args)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=3e-2)


def _abstract_inputs(num_tokens, max_num_seqs, dtype):
    # Realistic shapes for SmolLM2-135M: 3 KV heads, 3 query heads per KV head, head_dim 64, page 16.
    num_kv_heads, group, head_dim, page_size, num_pages, pages_per_seq = 3, 3, 64, 16, 256, 16
    pages = jax.ShapeDtypeStruct((num_kv_heads, num_pages, page_size, head_dim), dtype)
    return (jax.ShapeDtypeStruct((num_tokens, num_kv_heads * group, head_dim), dtype), pages, pages,
            jax.ShapeDtypeStruct((max_num_seqs,), jnp.int32),
            jax.ShapeDtypeStruct((max_num_seqs, pages_per_seq), jnp.int32),
            jax.ShapeDtypeStruct((max_num_seqs + 1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))


@pytest.mark.parametrize("platform,target", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype,num_tokens,max_q_len", [(jnp.float32, 128, None), (jnp.bfloat16, 32, 1)])
def test_kernel_lowers_for_gpu_and_tpu(platform, target, dtype, num_tokens, max_q_len):
    block_sizes = BlockSizes.get_default(page_size=16, max_q_len=max_q_len)
    fn = jax.jit(functools.partial(ragged_paged_attention, block_sizes=block_sizes, interpret=False))
    text = lowered_text(lambda: fn.trace(*_abstract_inputs(num_tokens, 32, dtype)), platform)
    assert target in text
    assert f"ragged_paged_attention_bq{block_sizes.block_q}_ppb{block_sizes.pages_per_block}" in text


def test_block_sizes_defaults_and_validation():
    assert BlockSizes.get_default(page_size=16) == BlockSizes(block_q=16, pages_per_block=4)
    assert BlockSizes.get_default(page_size=128, max_q_len=1) == BlockSizes(block_q=1, pages_per_block=1)
    assert BlockSizes.get_default(page_size=8, max_q_len=5).block_q == 8
    with pytest.raises(ValueError, match="block_q must be a positive power of two, got 3"):
        BlockSizes(block_q=3)
    with pytest.raises(ValueError, match="pages_per_block"):
        BlockSizes(pages_per_block=0)


def _replace(args, **changes):
    names = ("q", "k_pages", "v_pages", "kv_lens", "page_indices", "cu_q_lens", "num_seqs")
    values = dict(zip(names, args, strict=True))
    values.update(changes)
    return tuple(values[name] for name in names)


@pytest.mark.parametrize("change,match", [
    (lambda a: dict(q=a[0][0]), r"q.shape=\(4, 16\)"),
    (lambda a: dict(v_pages=a[2][:, :-1]), r"v_pages.shape="),
    (lambda a: dict(q=a[0][..., :8]), "head_dim or GQA grouping mismatch"),
    (lambda a: dict(q=a[0][:, :3]), "head_dim or GQA grouping mismatch"),
    (lambda a: dict(kv_lens=a[3][:-1]), r"kv_lens.shape=\(3,\)"),
    (lambda a: dict(cu_q_lens=a[5].astype(jnp.float32)), "cu_q_lens must be int32"),
    (lambda a: dict(page_indices=a[4].astype(jnp.int16)), "page_indices must be int32"),
    (lambda a: dict(q=a[0].astype(jnp.int32)), r"q.dtype=dtype\('int32'\)"),
    (lambda a: dict(v_pages=a[2].astype(jnp.bfloat16)), r"v_pages.dtype=dtype\(bfloat16\)"),
])
def test_wrapper_rejects_bad_shapes_and_dtypes(change, match):
    args = _make_inputs([1, 2, 1], [3, 9, 1], 4, 4, group=2)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*_replace(args, **change(args)), interpret=True)


def test_compiled_kernel_rejects_tiles_triton_cannot_dot():
    args = _make_inputs([1, 2, 1], [3, 9, 1], 4, 4, group=2)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        ragged_paged_attention(*args, block_sizes=BlockSizes(pages_per_block=1), interpret=False)
