"""KV page accounting: free list, reference counts and the prefix cache (host only, no jax).

A page is free when no sequence references it. Free pages that hold a complete, hashed page of
tokens stay findable in the prefix cache until the allocator reuses them (least recently freed
first), so a repeated system prompt is computed once and shared by reference.
Page hashes are chained: a page's hash covers its tokens and every token before it.
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Sequence as Tokens

from jaxinfer.engine.sequence import Sequence


def page_hash(parent: bytes | None, tokens: Tokens[int]) -> bytes:
    """sha256 over the parent hash and the page's token ids: collisions (which would hand one
    request another's KV) are not feasible to construct, unlike with Python's hash()."""
    return hashlib.sha256((parent or b"") + array.array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages=}, {page_size=}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self._free: dict[int, None] = dict.fromkeys(range(num_pages))  # insertion order = reuse order
        self._page_of_hash: dict[bytes, int] = {}
        self._hash_of_page: dict[int, bytes] = {}
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages holding seq's leading full pages (at least one token is left to compute).

        Requests with penalties compute every token: their per-request token history on the device
        is built from the tokens a step processes, which cached pages would skip.
        """
        if not self.enable_prefix_caching or seq.params.uses_penalties:
            return []
        hits, parent = [], seq.cache_salt
        limit = (seq.num_tokens - 1) // self.page_size
        for index in range(limit):
            start = index * self.page_size
            parent = page_hash(parent, seq.tokens(start, start + self.page_size))
            page = self._page_of_hash.get(parent)
            if page is None:
                break
            hits.append(page)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether seq (no pages yet) fits with the cached pages ``hits`` plus new pages."""
        reclaimed = sum(1 for page in hits if self.ref_counts[page] == 0)
        total = len(hits) * self.page_size + num_new_tokens
        return self.pages_needed(total) - len(hits) <= self.num_free - reclaimed

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give seq the cached pages ``hits`` (their tokens count as computed)."""
        for page in hits:
            self._take(page)
        seq.pages = list(hits)
        seq.page_hashes = [self._hash_of_page[page] for page in hits]
        seq.num_computed = len(hits) * self.page_size
        self.prefix_hit_tokens += seq.num_computed
        self.prefix_query_tokens += seq.num_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.pages_needed(seq.num_computed + num_new_tokens) - len(seq.pages) <= self.num_free

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Allocate pages so that seq can hold num_computed + num_new_tokens tokens."""
        for _ in range(self.pages_needed(seq.num_computed + num_new_tokens) - len(seq.pages)):
            page = next(iter(self._free))
            self._evict(page)
            self._take(page)
            seq.pages.append(page)

    def trim(self, seq: Sequence) -> None:
        """Release the pages past seq's computed tokens (allocated for a speculative round's tree)."""
        self.free_tail(seq, max(self.pages_needed(seq.num_computed), 1))

    def free_tail(self, seq: Sequence, keep: int) -> None:
        """Release seq's pages past its first ``keep``."""
        for page in reversed(seq.pages[keep:]):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self._free[page] = None
        del seq.pages[keep:]

    def commit(self, seq: Sequence) -> None:
        """Register seq's newly completed full pages in the prefix cache (after their KV is written)."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed // self.page_size, len(seq.pages))
        for index in range(len(seq.page_hashes), full):
            start = index * self.page_size
            parent = seq.page_hashes[-1] if seq.page_hashes else seq.cache_salt
            digest = page_hash(parent, seq.tokens(start, start + self.page_size))
            seq.page_hashes.append(digest)
            page = seq.pages[index]
            if digest not in self._page_of_hash and page not in self._hash_of_page:
                self._page_of_hash[digest] = page
                self._hash_of_page[page] = digest

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; pages no one references return to the free list (tail: reused last)."""
        for page in reversed(seq.pages):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] < 0:
                raise RuntimeError(f"page {page} released more often than taken")
            if self.ref_counts[page] == 0:
                self._free[page] = None
        seq.pages = []
        seq.page_hashes = []

    def _take(self, page: int) -> None:
        if self.ref_counts[page] == 0:
            del self._free[page]
        self.ref_counts[page] += 1

    def _evict(self, page: int) -> None:
        digest = self._hash_of_page.pop(page, None)
        if digest is not None:
            del self._page_of_hash[digest]
