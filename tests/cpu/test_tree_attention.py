"""CPU tree attention (jaxinfer_tree_attention in attention.cc): the reference's contract, and every node
bit for bit the decode row it stands for once its path is committed (what keeps speculative decoding exact
on the CPU fast path); decode rows the same whatever else the batch holds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.cpu import paged_attention as pa
from tests.kernels.test_tree_attention import _kv_lens, _make_inputs, _numpy_tree_attention
from tests.lowering import lowered_text

needs_kernels = pytest.mark.skipif(not pa.kernels_available(), reason="CPU kernels unavailable (no compiler?)")
PAGE = 16


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("page_size", [8, PAGE])
def test_tree_attention_matches_float64(dtype, page_size):
    # committed 0 (a tree alone), unaligned, straddling pages, a page multiple, longer than a split span;
    # random trees with a second root now and then; a padding request (no nodes: zeros)
    args = _make_inputs(_kv_lens(page_size) + [700], group=3, page_size=page_size, num_nodes=9, head_dim=64,
                        dtype=dtype)
    got = np.asarray(jax.jit(pa.tree_attention)(*args))
    np.testing.assert_allclose(got, _numpy_tree_attention(*args), atol=1e-5, rtol=1e-5)
    assert not got[-1].any()


def _committed_pool(k, v, pages, committed, mask_row, node_slots):
    """The pool as decoding would leave it once node i's path is committed: each ancestor's K/V moved from
    its tree slot committed + j to position committed + depth(j)."""
    k, v = np.asarray(k).copy(), np.asarray(v).copy()
    source_k, source_v = np.asarray(k).copy(), np.asarray(v).copy()
    for j in np.flatnonzero(mask_row):
        src, dst = committed + j, committed + node_slots[j]
        k[:, pages[dst // PAGE], dst % PAGE] = source_k[:, pages[src // PAGE], src % PAGE]
        v[:, pages[dst // PAGE], dst % PAGE] = source_v[:, pages[src // PAGE], src % PAGE]
    return jnp.asarray(k), jnp.asarray(v)


@needs_kernels
def test_every_node_is_bit_for_bit_its_decode_row():
    q, k, v, lens, pages, mask = _make_inputs([37, 600, 5, 16], group=4, page_size=PAGE, num_nodes=7, head_dim=64,
                                              num_padding=0, seed=3)
    out = np.asarray(jax.jit(pa.tree_attention)(q, k, v, lens, pages, mask))
    decode = jax.jit(pa.paged_decode_attention)
    for b in range(len(lens)):
        committed, masks, table = int(lens[b]), np.asarray(mask[b]), np.asarray(pages[b])
        depths = masks.sum(axis=1) - 1
        for i in range(masks.shape[0]):
            k_i, v_i = _committed_pool(k, v, table, committed, masks[i], depths)
            row = decode(q[b, i][None], k_i, v_i, jnp.asarray([committed + depths[i] + 1], jnp.int32), pages[b][None],
                         jnp.asarray([1], jnp.int32))
            np.testing.assert_array_equal(np.asarray(row)[0], out[b, i])


@needs_kernels
def test_a_decode_row_is_the_same_whatever_the_batch():
    """Rows split into spans by their length alone: a row alone and among others give the same bits."""
    rng = np.random.default_rng(4)
    lens = [1300, 5, 700, 2049, 64, 513]
    num_pages = len(lens) * 140
    q = jnp.asarray(rng.normal(size=(len(lens), 9, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, num_pages, PAGE, 64)), jnp.float32) for _ in range(2))
    table = jnp.asarray(rng.permutation(num_pages)[:len(lens) * 140].reshape(len(lens), 140), jnp.int32)
    decode = jax.jit(pa.paged_decode_attention)
    together = np.asarray(decode(q, k, v, jnp.asarray(lens, jnp.int32), table, jnp.asarray([len(lens)], jnp.int32)))
    for b, length in enumerate(lens):
        alone = decode(q[b:b + 1], k, v, jnp.asarray([length], jnp.int32), table[b:b + 1], jnp.asarray([1], jnp.int32))
        np.testing.assert_array_equal(np.asarray(alone)[0], together[b])


def test_reference_when_kernels_unavailable(monkeypatch):
    monkeypatch.setattr(pa, "_library", lambda: None)
    args = _make_inputs(_kv_lens(PAGE), group=2, page_size=PAGE, num_nodes=5, head_dim=16)
    fn = jax.jit(pa.tree_attention)
    assert "jaxinfer_" not in fn.lower(*args).as_text()
    np.testing.assert_allclose(fn(*args), _numpy_tree_attention(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gpu_and_tpu_lowering_has_no_custom_call(platform):
    args = _make_inputs(_kv_lens(PAGE), group=2, page_size=PAGE, num_nodes=5, head_dim=64)
    fn = jax.jit(functools.partial(pa.tree_attention, page_offset=8))
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    assert "jaxinfer_" not in lowered_text(lambda: fn.trace(*abstract), platform)


def test_validation():
    q, k, v, lens, pages, mask = _make_inputs([5, 9], group=2, page_size=PAGE, num_nodes=4, head_dim=16)
    with pytest.raises(ValueError, match="expected q"):
        pa.tree_attention(q[0], k, v, lens, pages, mask)
    with pytest.raises(ValueError, match="tree_mask"):
        pa.tree_attention(q, k, v, lens, pages, mask[:, :3])


@needs_kernels
@pytest.mark.parametrize("start", [45, 48, 50, 52])
def test_a_prompt_row_is_the_same_whatever_its_chunk(start):
    """A prompt row gives the same bits in a long chunk and in a short one starting later (what a prefix
    cache hit runs), and the last row the same as a decode row: slots are scored in fixed groups of four
    from the page's start, however far the tile reaches."""
    rng = np.random.default_rng(5)
    length = 53
    q = jnp.asarray(rng.normal(size=(length, 9, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, 20, PAGE, 64)), jnp.float32) for _ in range(2))
    table = jnp.asarray([[3, 7, 1, 9, 12, 0, 0, 0]], jnp.int32)
    one, lens = jnp.asarray([1], jnp.int32), jnp.asarray([length], jnp.int32)
    ragged = jax.jit(pa.ragged_paged_attention)
    whole = np.asarray(ragged(q, k, v, lens, table, jnp.asarray([0, length], jnp.int32), one))
    tail = np.asarray(ragged(q[start:], k, v, lens, table, jnp.asarray([0, length - start], jnp.int32), one))
    np.testing.assert_array_equal(tail, whole[start:])
    decode = pa.paged_decode_attention(q[length - 1:], k, v, lens, table, one)
    np.testing.assert_array_equal(np.asarray(decode)[0], whole[-1])
