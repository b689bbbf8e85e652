"""UniSparse references against float64 numpy loops written independently here."""

import numpy as np
import pytest

from jaxinfer.config import UniSparseConfig
from pallas_kernels.unisparse import block_scores, block_sparse_attention_reference, select_blocks


def qkv(t=64, h=4, kv=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(t, h, d)).astype(np.float32)
    k = rng.normal(size=(t, kv, d)).astype(np.float32)
    v = rng.normal(size=(t, kv, d)).astype(np.float32)
    return q, k, v


def numpy_scores(q, k, cfg, q_start=0, kv_len=None):
    t, h, d = q.shape
    tk = k.shape[0]
    kv_len = tk if kv_len is None else kv_len
    group = h // k.shape[1]
    s, cq, ck = cfg.block_size, cfg.c_q, cfg.c_k
    qc = q.astype(np.float64).reshape(t // cq, cq, h, d).mean(1)
    kc = k.astype(np.float64).reshape(tk // ck, ck, k.shape[1], d).mean(1)
    out = np.zeros((h, t // s, tk // s))
    for head in range(h):
        for a in range(t // cq):
            visible = [b for b in range(tk // ck) if b * ck <= q_start + (a + 1) * cq - 1 and b * ck < kv_len]
            logits = np.array([qc[a, head] @ kc[b, head // group] for b in visible]) / np.sqrt(d)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            for b, pb in zip(visible, p, strict=True):
                out[head, a * cq // s, b * ck // s] += pb / (s // cq)
    return out


def numpy_select(scores, cfg, first_block=0):
    h, nq, nk = scores.shape
    mask = np.zeros(scores.shape, bool)
    for head in range(h):
        for i in range(nq):
            b = first_block + i
            forced = [j for j in range(b + 1) if j < cfg.sink_blocks or j > b - cfg.local_blocks]
            rest = sorted((j for j in range(b + 1) if j not in forced), key=lambda j: -scores[head, i, j])
            kept, mass = list(forced), sum(scores[head, i, j] for j in forced)
            for j in rest:
                if mass >= cfg.tau or (cfg.max_blocks and len(kept) >= cfg.max_blocks):
                    break
                kept.append(j)
                mass += scores[head, i, j]
            mask[head, i, kept] = True
    return mask


def numpy_attention(q, k, v, mask, s, q_start=0):
    t, h, d = q.shape
    group = h // k.shape[1]
    out = np.zeros((t, h, d))
    for head in range(h):
        for x in range(t):
            keys = [y for y in range(q_start + x + 1) if mask[head, x // s, y // s]]
            logits = np.array([q[x, head].astype(np.float64) @ k[y, head // group] for y in keys]) / np.sqrt(d)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[x, head] = sum(pb * v[y, head // group].astype(np.float64) for pb, y in zip(p, keys, strict=True))
    return out


@pytest.mark.parametrize(("cq", "ck"), [(4, 4), (8, 2), (2, 8)])
def test_block_scores_match_numpy(cq, ck):
    cfg = UniSparseConfig(local_blocks=1, c_h=1, block_size=16, c_q=cq, c_k=ck)
    q, k, _ = qkv()
    got = np.asarray(block_scores(q, k, cfg))
    want = numpy_scores(q, k, cfg)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(got, 1) == 0)  # no mass on future blocks


@pytest.mark.parametrize("cfg", [UniSparseConfig(local_blocks=1, block_size=8, tau=0.6),
                                 UniSparseConfig(local_blocks=1, block_size=8, tau=0.9, sink_blocks=0),
                                 UniSparseConfig(block_size=8, tau=0.99, max_blocks=3, local_blocks=2)])
def test_selection_matches_numpy_and_keeps_forced_blocks(cfg):
    q, k, _ = qkv(t=128, seed=1)
    q[:, :, 0] *= 6  # sharper attention: selection has something to choose
    scores = block_scores(q, k, UniSparseConfig(local_blocks=1, c_h=1, block_size=8, c_q=4, c_k=4))
    mask, indices, counts = (np.asarray(x) for x in select_blocks(scores, cfg))
    want = numpy_select(np.asarray(scores, np.float64), cfg)
    np.testing.assert_array_equal(mask, want)
    nq = mask.shape[1]
    for i in range(nq):
        assert mask[:, i, i].all() and not mask[:, i, i + 1:].any()
        if cfg.sink_blocks:
            assert mask[:, i, 0].all()
    np.testing.assert_array_equal(counts, mask.sum(-1))
    for head in range(mask.shape[0]):
        for i in range(nq):
            kept = np.flatnonzero(mask[head, i])
            assert indices[head, i, :counts[head, i]].tolist() == kept.tolist()
            assert (indices[head, i, counts[head, i]:] == kept[-1]).all()
    assert mask.sum() < np.tril(np.ones((nq, nq))).sum() * mask.shape[0]  # actually sparse


def test_sparse_attention_reference_matches_numpy_and_dense():
    cfg = UniSparseConfig(local_blocks=1, c_h=1, block_size=8, c_q=4, c_k=4, tau=0.7)
    q, k, v = qkv(t=48, seed=2)
    mask, _, _ = select_blocks(block_scores(q, k, cfg), cfg)
    got = np.asarray(block_sparse_attention_reference(q, k, v, mask, 8))
    np.testing.assert_allclose(got, numpy_attention(q, k, v, np.asarray(mask), 8), atol=1e-5)
    full = np.broadcast_to(np.tril(np.ones((6, 6), bool)), (4, 6, 6))
    dense = np.asarray(block_sparse_attention_reference(q, k, v, full, 8))
    np.testing.assert_allclose(dense, numpy_attention(q, k, v, full, 8), atol=1e-5)


def test_config_is_validated():
    for bad in (dict(c_q=3), dict(tau=0.0), dict(block_size=0), dict(max_blocks=-1), dict(sink_blocks=-1)):
        with pytest.raises(ValueError):
            UniSparseConfig(**bad)
    with pytest.raises(ValueError, match="multiples of block_size"):
        block_scores(*qkv(t=60)[:2], UniSparseConfig(local_blocks=1, c_h=1, block_size=16, c_q=4, c_k=4))


def test_chunk_of_a_longer_sequence_matches_numpy():
    """Queries are the last blocks of the sequence (chunked prefill) and the keys have bucket padding."""
    cfg = UniSparseConfig(local_blocks=1, c_h=1, block_size=8, c_q=4, c_k=2, tau=0.8)
    q, k, v = qkv(t=80, seed=4)
    q[:, :, 0] *= 5
    q_part, q_start, kv_len = q[40:64], 40, 61  # rows past kv_len are bucket padding
    scores = np.asarray(block_scores(q_part, k, cfg, q_start=q_start, kv_len=kv_len))
    np.testing.assert_allclose(scores, numpy_scores(q_part, k, cfg, q_start, kv_len), atol=1e-5)
    mask, indices, counts = select_blocks(scores, cfg, q_start=q_start)
    np.testing.assert_array_equal(np.asarray(mask), numpy_select(scores.astype(np.float64), cfg, 5))
    got = np.asarray(block_sparse_attention_reference(q_part, k, v, mask, 8, q_start=q_start))
    np.testing.assert_allclose(got[:21], numpy_attention(q_part, k, v, np.asarray(mask), 8, q_start)[:21], atol=1e-5)


def _xla_case(seed, t=96, h=6, kv=2, d=16):
    q, k, v = qkv(t=t, h=h, kv=kv, d=d, seed=seed)
    q[:, :, 0] *= 5
    return q, k, v


@pytest.mark.parametrize(("chunk", "step", "q_start", "tq", "kv_len", "shared"),
                         [(2, 2, 0, 96, 96, False), (4, 3, 0, 96, 96, True), (1, 5, 32, 48, 75, False),
                          (3, 1, 48, 48, 96, True)])
def test_xla_sparse_path_equals_masked_reference(chunk, step, q_start, tq, kv_len, shared):
    from pallas_kernels.unisparse import block_sparse_attention_xla

    cfg = UniSparseConfig(local_blocks=1, c_h=1, block_size=8, c_q=4, c_k=4, tau=0.8)
    q, k, v = _xla_case(5)
    q_part = q[q_start:q_start + tq]
    mask, indices, counts = select_blocks(block_scores(q_part, k, cfg, q_start, kv_len), cfg, q_start)
    if shared:  # one list per KV head (3 query heads each): the union of its heads' lists
        mask = np.asarray(mask).reshape(2, 3, *mask.shape[1:]).any(axis=1)
    got = np.asarray(block_sparse_attention_xla(q_part, k, v, mask, block_size=8, q_start=q_start,
                                                kv_len=kv_len, query_blocks_per_item=chunk, blocks_per_step=step))
    real = kv_len - q_start
    per_head = np.repeat(np.asarray(mask), 3, axis=0) if shared else np.asarray(mask)
    want = numpy_attention(q_part, k, v, per_head, 8, q_start)
    np.testing.assert_allclose(got[:real], want[:real], atol=1e-5)
    causal = np.tril(np.ones((96 // 8, 96 // 8), bool))[q_start // 8:(q_start + tq) // 8]
    assert per_head.sum() < causal.sum() * 6  # some causal blocks were skipped


@pytest.mark.parametrize(("chunk", "step", "q_start", "tq", "kv_len"),
                         [(2, 2, 0, 96, 96), (3, 5, 0, 96, 96), (2, 3, 32, 64, 90)])
def test_xla_dense_blocked_path_equals_causal_attention(chunk, step, q_start, tq, kv_len):
    from pallas_kernels.unisparse import dense_blocked_attention_xla

    q, k, v = _xla_case(6)
    q_part = q[q_start:q_start + tq]
    got = np.asarray(dense_blocked_attention_xla(q_part, k, v, block_size=8, q_start=q_start, kv_len=kv_len,
                                                 query_blocks_per_item=chunk, blocks_per_step=step))
    full = np.ones((6, tq // 8, 96 // 8), bool)
    want = numpy_attention(q_part, k, v, full, 8, q_start)
    real = kv_len - q_start
    np.testing.assert_allclose(got[:real], want[:real], atol=1e-5)


def test_xla_paths_reject_bad_shapes():
    from pallas_kernels.unisparse import block_sparse_attention_xla, dense_blocked_attention_xla

    q, k, v = qkv(t=64)
    with pytest.raises(ValueError, match="query_blocks_per_item"):
        dense_blocked_attention_xla(q, k, v, block_size=8, query_blocks_per_item=3)
    with pytest.raises(ValueError, match="expected a mask"):
        block_sparse_attention_xla(q, k, v, np.ones((4, 8, 7), bool), block_size=8)
