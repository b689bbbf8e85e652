"""Tree attention: reference vs a float64 numpy loop, Pallas kernel vs reference, masking, lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tree_attention import tree_attention, tree_attention_reference
from tests.lowering import lowered_text

NUM_NODES = 6
NUM_KV_HEADS = 2
HEAD_DIM = 16


def _kv_lens(page_size):
    # 0 (a tree with no committed slots), unaligned, a tree straddling a page boundary for both page
    # sizes (13 + 6 > 16; 3L - 2 + 6 > 3L), and a page multiple.
    return [0, 5, 13, 3 * page_size - 2, 2 * page_size]


def _ancestors(parents):
    """[n, n] bool ancestor-or-self mask from parent pointers (parent < child, -1 for a root)."""
    mask = np.eye(len(parents), dtype=bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


def _random_parents(rng, num_nodes):
    # Mostly one tree under node 0; now and then another root (a forest is a valid mask too).
    parents = [-1]
    for j in range(1, num_nodes):
        parents.append(-1 if rng.random() < 0.15 else int(rng.integers(0, j)))
    return parents


def _make_inputs(kv_lens, *, group, page_size, num_nodes=NUM_NODES, num_padding=1, parents=None,
                 dtype=jnp.float32, seed=0, head_dim=HEAD_DIM):
    """Random trees, shuffled page tables (one spare column), padding requests whose page-table rows
    point outside the pool (they must never be read)."""
    rng = np.random.default_rng(seed)
    num_reqs = len(kv_lens) + num_padding
    pages_per_req = -(-(max(kv_lens) + num_nodes) // page_size) + 1
    num_pages = num_reqs * pages_per_req + 3
    num_heads = NUM_KV_HEADS * group
    q = rng.normal(size=(num_reqs, num_nodes, num_heads, head_dim)) / np.sqrt(head_dim)
    k_pages = rng.normal(size=(NUM_KV_HEADS, num_pages, page_size, head_dim)) / np.sqrt(head_dim)
    v_pages = rng.normal(size=(NUM_KV_HEADS, num_pages, page_size, head_dim))
    page_indices = rng.permutation(num_pages)[:num_reqs * pages_per_req].reshape(num_reqs, pages_per_req)
    page_indices[len(kv_lens):] = num_pages + 7
    lens = np.zeros(num_reqs, np.int32)
    lens[:len(kv_lens)] = kv_lens
    tree_mask = np.zeros((num_reqs, num_nodes, num_nodes), bool)
    for b in range(len(kv_lens)):
        tree_mask[b] = _ancestors(parents if parents is not None else _random_parents(rng, num_nodes))
    return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(lens),
            jnp.asarray(page_indices, jnp.int32), jnp.asarray(tree_mask))


def _numpy_tree_attention(q, k_pages, v_pages, kv_lens, page_indices, tree_mask, sm_scale=None):
    """Independent float64 loop over requests, nodes and heads, straight from the contract."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    kv_lens, page_indices, tree_mask = (np.asarray(x) for x in (kv_lens, page_indices, tree_mask))
    num_reqs, num_nodes, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for b in range(num_reqs):
        kv_len = int(kv_lens[b])
        for i in range(num_nodes):
            slots = list(range(kv_len)) + [kv_len + j for j in range(num_nodes) if tree_mask[b, i, j]]
            if not slots:
                continue
            pages = [page_indices[b, s // page_size] for s in slots]
            offsets = [s % page_size for s in slots]
            for h in range(num_heads):
                keys, values = k_pages[h // group, pages, offsets], v_pages[h // group, pages, offsets]
                scores = keys @ q[b, i, h] * scale
                probs = np.exp(scores - scores.max())
                out[b, i, h] = probs @ values / probs.sum()
    return out


@pytest.mark.parametrize("page_size", [4, 16])  # smaller and larger than the tree
@pytest.mark.parametrize("group", [1, 3])
def test_reference_matches_numpy_loop(group, page_size):
    kv_lens = _kv_lens(page_size)
    args = _make_inputs(kv_lens, group=group, page_size=page_size, seed=group * page_size)
    expected = _numpy_tree_attention(*args)
    out = tree_attention_reference(*args)
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    bounded = tree_attention_reference(*args, max_kv_tokens=max(kv_lens) + NUM_NODES)
    np.testing.assert_allclose(bounded, expected, atol=2e-5, rtol=1e-5)
    assert not np.any(np.asarray(out[len(kv_lens):]))  # the padding request


@pytest.mark.parametrize("group,page_size,pages_per_block", [(1, 4, 2), (3, 16, 1), (3, 4, None)])
def test_kernel_interpret_matches_reference(group, page_size, pages_per_block):
    args = _make_inputs(_kv_lens(page_size), group=group, page_size=page_size, seed=10 + group)
    out = tree_attention(*args, pages_per_block=pages_per_block, interpret=True)
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, tree_attention_reference(*args), atol=1e-5, rtol=1e-5)


def test_many_nodes_and_sm_scale():
    # 37 nodes: two words of ancestor bits per kernel row (a power of two already).
    args = _make_inputs([3, 11], group=1, page_size=8, num_nodes=37, seed=20)
    expected = _numpy_tree_attention(*args, sm_scale=0.3)
    np.testing.assert_allclose(tree_attention(*args, sm_scale=0.3, interpret=True), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(tree_attention_reference(*args, sm_scale=0.3), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,kv_lens,tol", [(jnp.float32, _kv_lens(4), 1e-5), (jnp.bfloat16, [13, 3], 3e-2)])
def test_kernel_mosaic_body_in_tpu_interpreter(dtype, kv_lens, tol):
    # The TPU body (scalar prefetch into SMEM, double-buffered page DMAs) run by the TPU interpreter;
    # "eager" DMAs catch a prefetch that overwrites a buffer still in use.
    args = _make_inputs(kv_lens, group=3, page_size=4, dtype=dtype, seed=30)
    params = pltpu.InterpretParams(dma_execution_mode="eager")
    out = tree_attention(*args, pages_per_block=1, interpret=params)
    np.testing.assert_allclose(out, tree_attention_reference(*args), atol=tol, rtol=tol)


def test_kernel_and_reference_bfloat16(monkeypatch):
    monkeypatch.delenv("JAXINFER_PALLAS_INTERPRET", raising=False)
    args = _make_inputs(_kv_lens(8), group=3, page_size=8, dtype=jnp.bfloat16, seed=40)
    expected = _numpy_tree_attention(*args)
    out = tree_attention(*args)  # interpret=None resolves to interpret mode on CPU
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(tree_attention_reference(*args), expected, atol=3e-2, rtol=3e-2)


def _overwrite_slots(args, request, slots, seed):
    """Replace the K/V of request's slots (in every KV head) with large values."""
    _, k_pages, v_pages, _, page_indices, _ = args
    page_size = k_pages.shape[2]
    pages = np.asarray(page_indices)[request, np.asarray(slots) // page_size]
    offsets = np.asarray(slots) % page_size
    rng = np.random.default_rng(seed)
    shape = (k_pages.shape[0], len(slots), k_pages.shape[3])
    k_pages = k_pages.at[:, pages, offsets].set(jnp.asarray(rng.normal(size=shape) * 50, k_pages.dtype))
    v_pages = v_pages.at[:, pages, offsets].set(jnp.asarray(rng.normal(size=shape) * 50, v_pages.dtype))
    return (args[0], k_pages, v_pages, *args[3:])


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_masked_slots_are_invisible(impl):
    # Node 5's ancestors are 3, 1, 0; nodes 2 and 4 (4 a child of 2) are on another branch.
    parents = [-1, 0, 0, 1, 2, 3]
    kv_lens = [7, 2]
    args = _make_inputs(kv_lens, group=2, page_size=4, parents=parents, seed=50)
    run = tree_attention_reference if impl == "reference" else functools.partial(tree_attention, interpret=True)
    base = np.asarray(run(*args))
    # Other branch of request 0: its nodes and their descendants change, node 5's line does not.
    out = np.asarray(run(*_overwrite_slots(args, 0, [kv_lens[0] + 2, kv_lens[0] + 4], seed=51)))
    np.testing.assert_array_equal(out[0, [0, 1, 3, 5]], base[0, [0, 1, 3, 5]])
    assert not np.allclose(out[0, [2, 4]], base[0, [2, 4]])
    np.testing.assert_array_equal(out[1:], base[1:])
    # An ancestor of node 5 is seen by node 5 (and by node 3, whose ancestor it is).
    out = np.asarray(run(*_overwrite_slots(args, 0, [kv_lens[0] + 1], seed=52)))
    assert not np.allclose(out[0, [1, 3, 5]], base[0, [1, 3, 5]])
    np.testing.assert_array_equal(out[0, [0, 2, 4]], base[0, [0, 2, 4]])
    # Slots past the tree are read by nobody.
    end = kv_lens[1] + len(parents)
    out = np.asarray(run(*_overwrite_slots(args, 1, list(range(end, end + 4)), seed=53)))
    np.testing.assert_array_equal(out, base)
    assert np.all(np.isfinite(base)) and not np.any(base[len(kv_lens):])


def _abstract_inputs(num_reqs, num_nodes, dtype):
    # Realistic shapes for SmolLM2-135M: 3 KV heads, 3 query heads per KV head, head_dim 64, page 16.
    num_kv_heads, group, head_dim, page_size, num_pages, pages_per_req = 3, 3, 64, 16, 256, 16
    pages = jax.ShapeDtypeStruct((num_kv_heads, num_pages, page_size, head_dim), dtype)
    return (jax.ShapeDtypeStruct((num_reqs, num_nodes, num_kv_heads * group, head_dim), dtype), pages, pages,
            jax.ShapeDtypeStruct((num_reqs,), jnp.int32),
            jax.ShapeDtypeStruct((num_reqs, pages_per_req), jnp.int32),
            jax.ShapeDtypeStruct((num_reqs, num_nodes, num_nodes), jnp.bool_))


@pytest.mark.parametrize("platform,target", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype,num_nodes", [(jnp.float32, 16), (jnp.bfloat16, 40)])
def test_kernel_lowers_for_gpu_and_tpu(platform, target, dtype, num_nodes):
    fn = jax.jit(functools.partial(tree_attention, interpret=False))
    text = lowered_text(lambda: fn.trace(*_abstract_inputs(8, num_nodes, dtype)), platform)
    assert target in text
    assert f"tree_attention_n{num_nodes}_ppb4" in text


def _replace(args, **changes):
    names = ("q", "k_pages", "v_pages", "kv_lens", "page_indices", "tree_mask")
    values = dict(zip(names, args, strict=True))
    values.update(changes)
    return tuple(values[name] for name in names)


@pytest.mark.parametrize("change,match", [
    (lambda a: dict(q=a[0][0]), r"q.shape=\(4, 4, 16\)"),
    (lambda a: dict(v_pages=a[2][:, :-1]), r"v_pages.shape="),
    (lambda a: dict(q=a[0][..., :8]), "head_dim or GQA grouping mismatch"),
    (lambda a: dict(q=a[0][:, :, :3]), "head_dim or GQA grouping mismatch"),
    (lambda a: dict(kv_lens=a[3][:-1]), r"kv_lens.shape=\(2,\)"),
    (lambda a: dict(tree_mask=a[5][:, :3]), r"tree_mask.shape=\(3, 3, 4\)"),
    (lambda a: dict(page_indices=a[4][0]), r"page_indices.shape=\(5,\)"),
    (lambda a: dict(kv_lens=a[3].astype(jnp.float32)), "kv_lens must be int32"),
    (lambda a: dict(page_indices=a[4].astype(jnp.int16)), "page_indices must be int32"),
    (lambda a: dict(tree_mask=a[5].astype(jnp.int32)), "tree_mask must be bool, got int32"),
    (lambda a: dict(q=a[0].astype(jnp.int32)), r"q.dtype=dtype\('int32'\)"),
    (lambda a: dict(v_pages=a[2].astype(jnp.bfloat16)), r"v_pages.dtype=dtype\(bfloat16\)"),
])
def test_wrappers_reject_bad_shapes_and_dtypes(change, match):
    args = _make_inputs([3, 9], group=2, page_size=4, num_nodes=4)
    for fn in (functools.partial(tree_attention, interpret=True), tree_attention_reference):
        with pytest.raises(ValueError, match=match):
            fn(*_replace(args, **change(args)))


def test_kernel_rejects_bad_pages_per_block_and_tiles_triton_cannot_dot():
    args = _make_inputs([3, 9], group=2, page_size=4, num_nodes=4)
    with pytest.raises(ValueError, match="pages_per_block must be a positive power of two, got 3"):
        tree_attention(*args, pages_per_block=3, interpret=True)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        tree_attention(*args, pages_per_block=2, interpret=False)
