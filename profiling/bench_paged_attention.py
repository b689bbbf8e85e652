"""Decode attention of SmolLM2-135M's 30 layers on CPU: the FFI kernel (reads pages in place) vs the
jnp reference (gathers the pages), each as one jitted step.

    python profiling/bench_paged_attention.py [--batches 1,8,32] [--contexts 128,512,2048]
        [--layouts shuffled,interleaved] [--page-size 16] [--dtype float32] [--isa auto] [--json FILE]

A step runs the 30 layers in sequence (K=3 KV heads, G=3, D=64, page size 16 by default): layer l
reads its pages at offset l * P of one pool, and its query depends on the previous layer's output,
as in the model. Every row has the given context (the new token counted). Page layouts:
``shuffled`` (every page anywhere in the pool, the worst case: each 4 KB page of f32 keys is a
separate random read) and ``interleaved`` (page j of row b at j * B + b: what the block manager
hands out when B sequences grow together; contiguous for B = 1). Reports the median and best step
time over the runs and the KV bytes read per step / median time. ``other_cores``: CPU time other
processes used during the timed runs, in cores (this host is shared; numbers with other_cores
above ~0.15 are noisy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cpu import paged_attention as pa
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

REPO = Path(__file__).resolve().parent.parent
LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64


def _busy_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def timed(function, *args, min_runs: int, max_seconds: float) -> dict:
    jax.block_until_ready(function(*args))  # compile and warm
    jax.block_until_ready(function(*args))
    runs = []
    busy0, own0 = _busy_ticks()
    start = time.perf_counter()
    while len(runs) < min_runs or (time.perf_counter() - start < max_seconds and len(runs) < 200):
        t0 = time.perf_counter()
        jax.block_until_ready(function(*args))
        runs.append(time.perf_counter() - t0)
        if time.perf_counter() - start > 4 * max_seconds:
            break
    wall = time.perf_counter() - start
    busy1, own1 = _busy_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / hz / wall)
    return {"median_ms": 1e3 * statistics.median(runs), "best_ms": 1e3 * min(runs), "runs": len(runs),
            "other_cores": round(other, 2)}


def make_inputs(batch: int, context: int, dtype, layout: str = "shuffled", page_size: int = 16, seed: int = 0):
    """q [layers, B, H, D]; pools [K, layers * P, L, D]; kv_lens, page_indices, num_seqs."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq  # P, pages per layer
    shape = (KV_HEADS, LAYERS * num_pages, page_size, HEAD_DIM)
    k_pages = jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)
    v_pages = jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32).astype(dtype)
    q = rng.normal(size=(LAYERS, batch, KV_HEADS * GROUP, HEAD_DIM)).astype(np.float32) / np.sqrt(HEAD_DIM)
    if layout == "shuffled":
        page_indices = rng.permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32)
    else:
        page_indices = np.arange(num_pages, dtype=np.int32).reshape(pages_per_seq, batch).T.copy()
    kv_lens = np.full(batch, context, np.int32)
    return (jnp.asarray(q), k_pages, v_pages, jnp.asarray(kv_lens), jnp.asarray(page_indices),
            jnp.asarray([batch], jnp.int32), num_pages)


def decode_step(impl: str, num_pages: int, isa: str):
    def step(q, k_pages, v_pages, kv_lens, page_indices, num_seqs):
        x = q[0]
        outs = []
        for layer in range(LAYERS):
            offset = layer * num_pages  # a Python int, as models/llama.py passes it
            if impl == "ffi":
                out = pa.paged_decode_attention(x, k_pages, v_pages, kv_lens, page_indices, num_seqs, offset, isa=isa)
            else:
                cu = jnp.arange(x.shape[0] + 1, dtype=jnp.int32)
                out = ragged_paged_attention_reference(x, k_pages, v_pages, kv_lens, page_indices + offset, cu,
                                                       num_seqs, max_q_len=1)
            outs.append(out)
            if layer + 1 < LAYERS:
                x = q[layer + 1] + 0.5 * out  # the next layer's query depends on this one
        return jnp.stack(outs)

    return jax.jit(step)


def bench_cell(batch: int, context: int, layout: str, dtype, impls: list[str], args) -> list[dict]:
    *inputs, num_pages = make_inputs(batch, context, dtype, layout, args.page_size)
    kv_bytes = LAYERS * batch * context * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize
    results = {impl: timed(decode_step(impl, num_pages, args.isa), *inputs, min_runs=5, max_seconds=args.seconds)
               for impl in impls}
    max_err = None
    if "ffi" in results and "reference" in results:
        got, want = (np.asarray(decode_step(i, num_pages, args.isa)(*inputs)) for i in ("ffi", "reference"))
        max_err = float(np.max(np.abs(got - want)))
    rows = []
    for impl, r in results.items():
        gbps = kv_bytes / (r["median_ms"] * 1e-3) / 1e9
        speedup = results["reference"]["median_ms"] / r["median_ms"] if "reference" in results else None
        rows.append({"batch": batch, "context": context, "layout": layout, "page_size": args.page_size, "impl": impl,
                     "dtype": jnp.dtype(dtype).name,
                     "kv_mb": kv_bytes / 1e6, "gb_per_s": gbps, "speedup": speedup, "max_abs_err": max_err, **r})
        print(f"{batch:>3} {context:>5} {layout:>11} {impl:>9} {r['median_ms']:>10.2f} {r['best_ms']:>8.2f} "
              f"{gbps:>6.1f} {speedup or 0:>7.1f}x {r['other_cores']:>6.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--layouts", default="shuffled,interleaved")
    parser.add_argument("--page-size", type=int, default=16, help="CacheConfig's default is 16")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--isa", default="auto", choices=tuple(pa.ISAS))
    parser.add_argument("--impls", default="ffi,reference")
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per cell (at least 5 runs)")
    parser.add_argument("--json", default=str(REPO / "profiling" / "results" / "paged_attention.json"))
    args = parser.parse_args()
    if not pa.kernels_available():
        raise SystemExit("the CPU kernels are unavailable (jaxinfer.cpu.build.load() returned None)")
    dtype = jnp.dtype(args.dtype)
    impls = args.impls.split(",")
    rows = []
    print(f"{'B':>3} {'ctx':>5} {'layout':>11} {'impl':>9} {'median ms':>10} {'best ms':>8} {'GB/s':>6} "
          f"{'speedup':>8} {'other':>6}")
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            for layout in args.layouts.split(","):
                rows += bench_cell(batch, context, layout, dtype, impls, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "benchmark": "paged_attention", "date": datetime.date.today().isoformat(), "args": vars(args),
        "jax": jax.__version__, "isas": pa.supported_isas(), "cpu_count": os.cpu_count(),
        "shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "group": GROUP, "head_dim": HEAD_DIM},
        "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
