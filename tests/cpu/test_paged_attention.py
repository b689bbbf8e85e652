"""CPU paged attention (FFI kernels in jaxinfer/cpu/attention.cc) vs the jnp reference; every ISA path
the host runs vs the scalar one; the fallbacks; lowering for GPU/TPU without the custom call."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.cpu import paged_attention as pa
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from tests.lowering import lowered_text

needs_kernels = pytest.mark.skipif(not pa.kernels_available(), reason="CPU kernels unavailable (no compiler?)")
ISAS = [isa for isa in pa.supported_isas() if isa != "auto"]
KV_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _lens(batch, page_size, seed):
    """Ragged kv lengths: 1, page-1, page, page+1, several pages, 0, then random."""
    rng = np.random.default_rng(seed)
    base = [1, max(1, page_size - 1), page_size, page_size + 1, 3 * page_size + 5, 0]
    extra = rng.integers(1, 5 * page_size + 2, size=max(0, batch - len(base)))
    return np.array((base + list(extra))[:batch], np.int32)


def _make_inputs(batch, *, group, head_dim, page_size, num_kv_heads=2, num_seqs=None, page_offset=0,
                 lens=None, dtype=jnp.float32, seed=0):
    """Unit-norm-ish q/k, shuffled page tables with one spare column, a pool with page_offset pages
    in front (another layer's) and a few spare pages."""
    rng = np.random.default_rng(seed)
    lens = _lens(batch, page_size, seed) if lens is None else np.asarray(lens, np.int32)
    pages_per_seq = -(-int(lens.max()) // page_size) + 1
    num_pages = page_offset + batch * pages_per_seq + 3
    q = rng.normal(size=(batch, num_kv_heads * group, head_dim)) / np.sqrt(head_dim)
    k_pages = rng.normal(size=(num_kv_heads, num_pages, page_size, head_dim)) / np.sqrt(head_dim) * 4
    v_pages = rng.normal(size=(num_kv_heads, num_pages, page_size, head_dim))
    page_indices = rng.permutation(num_pages - page_offset)[:batch * pages_per_seq].reshape(batch, pages_per_seq)
    num_seqs = batch if num_seqs is None else num_seqs
    return (jnp.asarray(q, jnp.float32), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
            jnp.asarray(lens), jnp.asarray(page_indices, jnp.int32), jnp.asarray([num_seqs], jnp.int32))


def _reference(q, k_pages, v_pages, kv_lens, page_indices, num_seqs, page_offset=0, sm_scale=None):
    """The reference on f32 copies of the pages (the kernels accumulate bf16/f16 KV in f32)."""
    cu = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return ragged_paged_attention_reference(q, k_pages.astype(jnp.float32), v_pages.astype(jnp.float32), kv_lens,
                                            page_indices + page_offset, cu, num_seqs, sm_scale=sm_scale, max_q_len=1)


@functools.cache
def _decode(isa, page_offset, sm_scale=None):
    return jax.jit(functools.partial(pa.paged_decode_attention, page_offset=page_offset, sm_scale=sm_scale, isa=isa))


# (B, G, D, L, num_seqs, page_offset): B in {1, 3, 8, 32}, padding rows where num_seqs < B.
DECODE_CASES = [
    (1, 3, 64, 16, 1, 0),
    (3, 1, 64, 4, 3, 5),
    (8, 3, 64, 16, 6, 17),
    (8, 1, 128, 8, 8, 0),
    (32, 3, 64, 16, 29, 40),
    (32, 3, 128, 32, 32, 3),
    (3, 3, 128, 1, 2, 2),
    (8, 5, 64, 128, 7, 1),  # G > 4: two groups of query rows; a page larger than a softmax block
]


@needs_kernels
@pytest.mark.parametrize("isa", ISAS + ["auto"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "B{}-G{}-D{}-L{}-n{}-off{}".format(*c))
def test_decode_matches_reference(case, isa):
    batch, group, head_dim, page_size, num_seqs, offset = case
    args = _make_inputs(batch, group=group, head_dim=head_dim, page_size=page_size, num_seqs=num_seqs,
                        page_offset=offset, seed=batch + group + head_dim + page_size)
    out = _decode(isa, offset)(*args)
    assert out.dtype == jnp.float32 and out.shape == args[0].shape
    np.testing.assert_allclose(out, _reference(*args, page_offset=offset), atol=1e-5, rtol=1e-5)
    lens, valid = np.asarray(args[3]), np.arange(batch) < num_seqs
    assert not np.any(np.asarray(out)[~valid | (lens == 0)]), "padding and empty rows must be zero"


@needs_kernels
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("isa", ISAS)
def test_isa_paths_match_scalar_and_reference(isa, dtype):
    args = _make_inputs(8, group=3, head_dim=64, page_size=16, num_kv_heads=3, num_seqs=7, page_offset=9,
                        dtype=dtype, seed=3)
    out = _decode(isa, 9)(*args)
    np.testing.assert_allclose(out, _decode("scalar", 9)(*args), atol=2e-6, rtol=2e-6)
    np.testing.assert_allclose(out, _reference(*args, page_offset=9), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16), ids=lambda d: jnp.dtype(d).name)
def test_half_kv_close_to_reference_on_half_pages(dtype):
    """The reference itself on bf16/f16 pages (it rounds the probabilities to the KV dtype)."""
    args = _make_inputs(8, group=3, head_dim=128, page_size=16, num_seqs=8, dtype=dtype, seed=4)
    cu = jnp.arange(9, dtype=jnp.int32)
    expected = ragged_paged_attention_reference(*args[:5], cu, args[5], max_q_len=1)
    np.testing.assert_allclose(_decode("auto", 0)(*args), expected, atol=3e-2, rtol=3e-2)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_long_rows_split_across_threads(isa):
    """Rows long enough to be split into spans merged afterwards (and enough work to use the pool)."""
    lens = [3000, 1, 700, 2049]
    args = _make_inputs(4, group=3, head_dim=64, page_size=16, num_kv_heads=3, lens=lens, page_offset=6, seed=5)
    out = _decode(isa, 6, 0.2)(*args)
    np.testing.assert_allclose(out, _reference(*args, page_offset=6, sm_scale=0.2), atol=1e-5, rtol=1e-5)
    single = _make_inputs(1, group=3, head_dim=64, page_size=16, num_kv_heads=3, lens=[4000], seed=6)
    np.testing.assert_allclose(_decode(isa, 0)(*single), _reference(*single), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_deterministic_and_traced_page_offset():
    args = _make_inputs(32, group=3, head_dim=64, page_size=16, num_kv_heads=3, lens=[900] * 32, page_offset=4,
                        seed=7)
    fn = jax.jit(lambda offset, *a: pa.paged_decode_attention(*a, page_offset=offset))
    first = np.asarray(fn(jnp.int32(4), *args))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(fn(jnp.int32(4), *args)), first)
    np.testing.assert_allclose(first, _reference(*args, page_offset=4), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_out_of_range_pages_and_lengths_are_clamped_like_the_reference():
    args = list(_make_inputs(3, group=1, head_dim=64, page_size=4, lens=[5, 9, 2], seed=8))
    pages = np.asarray(args[4]).copy()
    pages[0, 0], pages[1, 1] = 10_000, -7
    args[4] = jnp.asarray(pages)
    args[3] = jnp.asarray([5, 10_000, 2], jnp.int32)  # past the page table: clamped to Pmax * L
    np.testing.assert_allclose(_decode("auto", 0)(*args), _reference(*args), atol=1e-5, rtol=1e-5)


# name -> (q_lens, kv_lens, B, T), as in tests/kernels/test_ragged_paged_attention.py
RAGGED_CASES = {
    "decode": ([1, 1, 1, 1, 1], [1, 7, 8, 9, 35], 6, 6),
    "prefill": ([9, 5, 19], [9, 21, 19], 3, 36),
    "mixed": ([1, 3, 0, 1, 9, 2], [7, 3, 5, 35, 16, 2], 8, 20),
    "long": ([40, 3], [300, 3], 2, 48),
}


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("name", list(RAGGED_CASES))
def test_ragged_matches_reference(name, group, isa):
    q_lens, kv_lens, batch, num_tokens = RAGGED_CASES[name]
    rng = np.random.default_rng(len(name) + group)
    lens = np.zeros(batch, np.int32)
    lens[:len(kv_lens)] = kv_lens
    _, k_pages, v_pages, kv, page_indices, _ = _make_inputs(batch, group=group, head_dim=64, page_size=8,
                                                            lens=np.maximum(lens, 1), page_offset=3, seed=11)
    kv = jnp.asarray(lens)
    q = jnp.asarray(rng.normal(size=(num_tokens, 2 * group, 64)) / 8, jnp.float32)
    cu = np.zeros(batch + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    args = (q, k_pages, v_pages, kv, page_indices, jnp.asarray(cu), jnp.asarray([len(q_lens)], jnp.int32))
    out = jax.jit(functools.partial(pa.ragged_paged_attention, page_offset=3, isa=isa))(*args)
    expected = ragged_paged_attention_reference(*args[:4], page_indices + 3, *args[5:])
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_a_row_has_the_same_bits_wherever_its_chunk_starts(isa):
    """A prompt's last rows prefilled in a short chunk after a prefix-cache hit give the bits the whole
    prompt's chunk gave them, although their tiles hold other rows (3 heads a token: the rows of a tile
    are scored 1-4 at a time)."""
    _, k_pages, v_pages, _, page_indices, _ = _make_inputs(1, group=3, head_dim=64, page_size=16, lens=[53],
                                                           num_kv_heads=3, seed=13)
    q = jnp.asarray(np.random.default_rng(13).normal(size=(64, 9, 64)) / 8, jnp.float32)
    attend = jax.jit(functools.partial(pa.ragged_paged_attention, isa=isa))

    def chunk(start):  # query rows start..52 of a 53-token prompt, padded to 64 rows
        rows = jnp.zeros_like(q).at[:53 - start].set(q[start:53])
        out = attend(rows, k_pages, v_pages, jnp.asarray([53], jnp.int32), page_indices,
                     jnp.asarray([0, 53 - start], jnp.int32), jnp.asarray([1], jnp.int32))
        return np.asarray(out[:53 - start])

    whole = chunk(0)
    for start in (48, 49, 50, 52):
        np.testing.assert_array_equal(chunk(start), whole[start:])


@needs_kernels
def test_more_query_heads_per_kv_head_than_a_tile_holds():
    """G = 18 > 16 rows per tile: decode splits the heads over tiles, ragged puts one token per tile."""
    args = _make_inputs(3, group=18, head_dim=64, page_size=8, num_kv_heads=1, num_seqs=3, seed=12)
    np.testing.assert_allclose(_decode("auto", 0)(*args), _reference(*args), atol=1e-5, rtol=1e-5)
    q = jnp.concatenate([args[0], args[0][:2] * 0.5])  # [5, 18, 64]: 1 + 3 + 1 query rows
    cu, kv_lens = jnp.asarray([0, 1, 4, 5], jnp.int32), jnp.asarray([1, 7, 3], jnp.int32)
    ragged_args = (q, args[1], args[2], kv_lens, args[4], cu, args[5])
    np.testing.assert_allclose(jax.jit(pa.ragged_paged_attention)(*ragged_args),
                               ragged_paged_attention_reference(*ragged_args), atol=1e-5, rtol=1e-5)


def test_reference_when_kernels_unavailable(monkeypatch):
    monkeypatch.setattr(pa, "_library", lambda: None)
    args = _make_inputs(3, group=3, head_dim=64, page_size=16, num_seqs=2, page_offset=2, seed=9)
    fn = jax.jit(functools.partial(pa.paged_decode_attention, page_offset=2))
    assert "jaxinfer_" not in fn.lower(*args).as_text()
    np.testing.assert_allclose(fn(*args), _reference(*args, page_offset=2), atol=1e-6)
    assert pa.supported_isas() == ("auto",)


@needs_kernels
def test_cpu_lowering_has_the_custom_call():
    args = _make_inputs(3, group=3, head_dim=64, page_size=16, seed=9)
    assert pa.DECODE_TARGET in jax.jit(pa.paged_decode_attention).lower(*args).as_text()


def _abstract_decode(dtype):
    # SmolLM2-135M: 3 KV heads, 3 query heads per KV head, head_dim 64, page 16.
    pages = jax.ShapeDtypeStruct((3, 256, 16, 64), dtype)
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    return (jax.ShapeDtypeStruct((8, 9, 64), jnp.float32), pages, pages, i32((8,)), i32((8, 16)), i32((1,)))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_gpu_and_tpu_lowering_has_no_custom_call(platform, dtype):
    decode = jax.jit(functools.partial(pa.paged_decode_attention, page_offset=32))
    text = lowered_text(lambda: decode.trace(*_abstract_decode(dtype)), platform)
    assert "jaxinfer_" not in text
    pages, i32 = _abstract_decode(dtype)[1], functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    ragged = jax.jit(functools.partial(pa.ragged_paged_attention, page_offset=32))
    abstract = (jax.ShapeDtypeStruct((40, 9, 64), jnp.float32), pages, pages, i32((4,)), i32((4, 16)), i32((5,)),
                i32((1,)))
    assert "jaxinfer_" not in lowered_text(lambda: ragged.trace(*abstract), platform)


def test_validation():
    args = _make_inputs(3, group=3, head_dim=64, page_size=16, seed=9)
    with pytest.raises(ValueError, match="isa must be one of"):
        pa.paged_decode_attention(*args, isa="sse9")
    with pytest.raises(ValueError, match="grouping mismatch"):
        pa.paged_decode_attention(args[0][:, :5], *args[1:])
    with pytest.raises(ValueError, match="kv_lens"):
        pa.paged_decode_attention(args[0], *args[1:3], args[3][:2], *args[4:])
