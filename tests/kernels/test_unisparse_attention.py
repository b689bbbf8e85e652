"""The composed UniSparse op (scores -> selection -> attention) agrees across its implementations."""

import numpy as np
import pytest

from jaxinfer.config import UniSparseConfig
from pallas_kernels.unisparse import dense_attention, select, sparse_attention
from tests.kernels.test_unisparse_reference import numpy_attention


def _case(t=128, h=6, kv=2, d=16, seed=7):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(t, h, d)).astype(np.float32)
    q[:, :, 0] *= 6
    return q, rng.normal(size=(t, kv, d)).astype(np.float32), rng.normal(size=(t, kv, d)).astype(np.float32)


@pytest.mark.parametrize("share", [True, False])
def test_sparse_attention_implementations_agree_and_match_numpy(share):
    cfg = UniSparseConfig(local_blocks=1, c_h=1, block_size=16, c_q=4, c_k=4, tau=0.7, share_kv_heads=share)
    q, k, v = _case()
    selection = select(q, k, cfg)
    assert selection.mask.shape[0] == (2 if share else 6)
    mask = np.asarray(selection.per_query_head(6).mask)
    want = numpy_attention(q, k, v, mask, 16)
    for impl in ("xla", "reference", "pallas"):
        got = np.asarray(sparse_attention(q, k, v, cfg, impl=impl, interpret=True))
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)
    causal = np.tril(np.ones((8, 8), bool))
    density = float(selection.density(16))
    assert density == pytest.approx(np.asarray(selection.mask).sum() / (causal.sum() * selection.mask.shape[0]))
    assert 0 < density < 1


def test_dense_attention_implementations_agree_with_a_chunk_offset():
    q, k, v = _case(seed=8)
    full = np.ones((6, 4, 8), bool)
    want = numpy_attention(q[64:], k, v, full, 16, q_start=64)
    for impl in ("xla", "reference", "pallas"):
        got = np.asarray(dense_attention(q[64:], k, v, 16, q_start=64, impl=impl, interpret=True))
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)


def test_unknown_impl_is_refused():
    q, k, v = _case(t=32)
    with pytest.raises(ValueError, match="unknown UniSparse impl"):
        sparse_attention(q, k, v, UniSparseConfig(local_blocks=1, c_h=1, block_size=16, c_q=4, c_k=4), impl="cuda")


def test_chunked_scores_equal_the_whole_score_map():
    from pallas_kernels.unisparse import block_scores
    from pallas_kernels.unisparse.xla import chunked_block_scores

    rng = np.random.default_rng(9)
    q = rng.normal(size=(256, 6, 16)).astype(np.float32)
    k = rng.normal(size=(384, 2, 16)).astype(np.float32)
    cfg = UniSparseConfig(local_blocks=1, c_h=1, block_size=16, c_q=2, c_k=4)
    whole = np.asarray(block_scores(q, k, cfg, 128, 300))
    chunked = np.asarray(chunked_block_scores(q, k, cfg, 128, 300, max_logits=6 * 8 * 96 * 3))  # 3 blocks a chunk
    np.testing.assert_allclose(chunked, whole, atol=1e-6)


def test_head_compression_scores_the_mean_query_of_each_group():
    from pallas_kernels.unisparse import block_scores, select_blocks

    q, k, _ = _case(seed=10)
    cfg = UniSparseConfig(local_blocks=1, block_size=16, c_q=2, c_k=4, tau=0.7, c_h=0)  # 0: all 3 heads of a KV group
    pooled = q.reshape(128, 2, 3, 16).mean(axis=2)
    want = select_blocks(block_scores(pooled, k, cfg), cfg)[0]  # one map per KV head already
    np.testing.assert_array_equal(np.asarray(select(q, k, cfg).mask), np.asarray(want))
    per_head = select(q, k, UniSparseConfig(local_blocks=1, block_size=16, c_q=2, c_k=4, tau=0.7, c_h=3,
                                            share_kv_heads=False))
    np.testing.assert_array_equal(np.asarray(per_head.mask), np.repeat(np.asarray(want), 3, axis=0))
    with pytest.raises(ValueError, match="c_h=2 must divide the 3 query heads"):
        select(q, k, UniSparseConfig(local_blocks=1, block_size=16, c_q=2, c_k=4, c_h=2))
