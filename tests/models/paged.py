"""Run the paged model directly (no engine) on given sequences: the test harness for model code."""

import jax.numpy as jnp
import numpy as np

from jaxinfer.layers.attention import RaggedMeta
from jaxinfer.layers.kv_pages import KVPages

PAGE_SIZE = 4
MAX_PAGES_PER_SEQ = 32


def new_cache(cfg, num_pages=64, dtype=jnp.float32):
    return KVPages.init(cfg, num_pages, PAGE_SIZE, dtype)


def page_table(seed, count, num_pages=64):
    """count distinct pages in shuffled order."""
    return np.random.default_rng(seed).permutation(num_pages)[:count].astype(np.int32)


def _slots(pages, positions):
    return pages[positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE


def prefill(model, kv, chunks):
    """chunks: list of (tokens, start, pages) prompt chunks; returns logits of every token, kv."""
    num_seqs = len(chunks)
    tokens, positions, slots = [], [], []
    kv_lens = np.zeros(num_seqs, np.int32)
    tables = np.zeros((num_seqs, MAX_PAGES_PER_SEQ), np.int32)
    cu = np.zeros(num_seqs + 1, np.int32)
    for i, (ids, start, pages) in enumerate(chunks):
        pos = np.arange(start, start + len(ids))
        tokens += list(ids)
        positions += list(pos)
        slots += list(_slots(pages, pos))
        kv_lens[i] = start + len(ids)
        tables[i, :len(pages)] = pages
        cu[i + 1] = cu[i] + len(ids)
    meta = RaggedMeta.prompts(np.asarray(slots, np.int32), kv_lens, tables, cu)
    logits, kv = model(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), kv, meta,
                       jnp.arange(len(tokens), dtype=jnp.int32))
    return np.asarray(logits), kv


def decode(model, kv, rows):
    """rows: list of (token, position, pages) one-token decodes; returns logits [rows, V], kv."""
    positions = np.asarray([pos for _, pos, _ in rows], np.int32)
    tables = np.zeros((len(rows), MAX_PAGES_PER_SEQ), np.int32)
    for i, (_, _, pages) in enumerate(rows):
        tables[i, :len(pages)] = pages
    slots = [_slots(pages, np.asarray(pos))[()] for _, pos, pages in rows]
    meta = RaggedMeta.decodes(np.asarray(slots, np.int32), positions + 1, tables)
    logits, kv = model(jnp.asarray([t for t, _, _ in rows], jnp.int32), jnp.asarray(positions), kv, meta,
                       jnp.arange(len(rows), dtype=jnp.int32))
    return np.asarray(logits), kv
