"""Block manager: page accounting, reference counts, prefix cache hits and eviction (host only)."""

import pytest

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.sequence import Sequence
from jaxinfer.sampling_params import SamplingParams


def _seq(ids, name="r"):
    return Sequence(name, ids, SamplingParams())


def _run_prompt(blocks, seq):
    """Admit with prefix hits, allocate the rest, mark computed and commit full pages."""
    hits = blocks.match_prefix(seq)
    blocks.admit(seq, hits)
    blocks.append(seq, seq.num_tokens - seq.num_computed)
    seq.num_computed = seq.num_tokens
    blocks.commit(seq)
    return hits


def test_allocate_and_free_return_every_page():
    blocks = BlockManager(num_pages=10, page_size=4)
    seq = _seq(list(range(10)))
    _run_prompt(blocks, seq)
    assert len(seq.pages) == 3 and blocks.num_free == 7
    blocks.free(seq)
    assert blocks.num_free == 10 and all(count == 0 for count in blocks.ref_counts)


def test_shared_prefix_pages_are_shared_by_reference():
    blocks = BlockManager(num_pages=10, page_size=4)
    system = list(range(100, 108))  # two full pages
    first, second = _seq(system + [1, 2, 3], "a"), _seq(system + [7, 8], "b")
    _run_prompt(blocks, first)
    hits = _run_prompt(blocks, second)
    assert hits == first.pages[:2] and second.num_cached == 0  # num_cached is set by the scheduler
    assert [blocks.ref_counts[p] for p in first.pages[:2]] == [2, 2]
    assert second.pages[2] != first.pages[2]
    blocks.free(first)
    assert [blocks.ref_counts[p] for p in second.pages[:2]] == [1, 1]
    blocks.free(second)
    assert blocks.num_free == 10


def test_last_token_is_never_served_from_cache():
    blocks = BlockManager(num_pages=10, page_size=4)
    ids = list(range(8))
    _run_prompt(blocks, _seq(ids, "a"))
    again = _seq(ids, "b")
    assert len(blocks.match_prefix(again)) == 1  # page 2 holds the last token, which must be computed


def test_freed_cached_pages_stay_findable_until_reused():
    blocks = BlockManager(num_pages=3, page_size=2)
    first = _seq([1, 2, 3, 4, 5], "a")
    _run_prompt(blocks, first)
    blocks.free(first)
    assert blocks.num_free == 3
    assert len(blocks.match_prefix(_seq([1, 2, 3, 4, 9], "b"))) == 2
    other = _seq([7, 7, 7, 7, 7], "c")
    _run_prompt(blocks, other)  # needs all three pages: the cached ones are evicted
    assert blocks.match_prefix(_seq([1, 2, 3, 4, 9], "d")) == []
    blocks.free(other)


def test_can_admit_counts_reclaimed_cached_pages():
    blocks = BlockManager(num_pages=2, page_size=2)
    first = _seq([1, 2, 3], "a")
    _run_prompt(blocks, first)
    blocks.free(first)
    again = _seq([1, 2, 3], "b")
    hits = blocks.match_prefix(again)
    assert len(hits) == 1
    assert blocks.can_admit(again, hits, 1)  # the hit page leaves the free list: 1 free page remains
    assert not blocks.can_admit(again, hits, 3)


def test_double_free_is_detected():
    blocks = BlockManager(num_pages=4, page_size=2)
    seq = _seq([1, 2, 3])
    _run_prompt(blocks, seq)
    pages = list(seq.pages)
    blocks.free(seq)
    seq.pages = pages
    with pytest.raises(RuntimeError, match="released more often"):
        blocks.free(seq)
