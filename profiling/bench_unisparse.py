"""UniSparse speed on this machine.

``attention``: attention alone at 4K-32K tokens on q/k/v taken from one layer of the real model:
UniSparse (composite-token scores + selection + block-sparse attention, XLA path) against the dense
attention with the same blocking. Up to 8K the q/k/v come from one window of long text; longer
inputs concatenate the q/k/v of consecutive 8K windows (each window carries its own rotary positions
0..8191, so cross-window attention is weaker than a real 32K prompt's).

``prefill``: end-to-end prefill tokens/s of one long prompt through the engine (time to first
token, one output token), with the prefill backend 'off' (paged), 'dense_blocked' and 'sparse'.

    python profiling/bench_unisparse.py attention --lengths 4096,8192,16384,32768
    python profiling/bench_unisparse.py prefill --length 8000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig, SparsePrefillConfig, UniSparseConfig
from jaxinfer.datasets import long_texts
from jaxinfer.layers.rotary import inverse_frequencies
from jaxinfer.loader import load_model
from pallas_kernels.unisparse import dense_attention, select, sparse_attention

WINDOW = 8192


def long_text_ids(tokenizer, count: int) -> list[int]:
    """The first ``count`` tokens of the long texts (the essays followed by the books of the shared data
    folder, else jaxinfer's own sources)."""
    texts, _ = long_texts()
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        if len(ids) >= count:
            return ids[:count]
    raise ValueError(f"the long texts hold only {len(ids)} tokens, {count} asked")


def layer_qkv(model, ids: list[int], layer: int):
    """q [T, H, D], k and v [T, K, D] entering ``layer``'s attention, computing the layers below densely."""
    config = model.config
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    @jax.jit
    def run(tokens):
        positions = jnp.arange(tokens.shape[0])
        x = model.embed(tokens)
        for block in model.layers[:layer]:
            q, k, v = block.self_attn.project(block.input_layernorm(x), positions, inv_freq)
            out = dense_attention(q, k, v, 64)
            x = x + block.self_attn.o_proj(out.reshape(x.shape[0], -1))
            x = x + block.mlp(block.post_attention_layernorm(x))
        block = model.layers[layer]
        return block.self_attn.project(block.input_layernorm(x), positions, inv_freq)

    return run(jnp.asarray(ids, jnp.int32))


def timed(function, *args, repeats: int) -> float:
    jax.block_until_ready(function(*args))  # compile
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bench_attention(args, loaded) -> list[dict]:
    config = UniSparseConfig(block_size=args.block_size, c_q=args.c_q, c_k=args.c_k, c_h=args.c_h, tau=args.tau)
    lengths = [int(x) for x in args.lengths.split(",")]
    windows = -(-max(lengths) // WINDOW)
    ids = long_text_ids(loaded.tokenizer, windows * WINDOW)
    parts = []
    for w in range(windows):
        print(f"capturing layer {args.layer} q/k/v, window {w + 1}/{windows}", file=sys.stderr, flush=True)
        parts.append(jax.device_get(layer_qkv(loaded.model, ids[w * WINDOW:(w + 1) * WINDOW], args.layer)))
    q_all, k_all, v_all = (np.concatenate([p[i] for p in parts]) for i in range(3))
    dense_fn = jax.jit(lambda q, k, v: dense_attention(q, k, v, config.block_size))
    select_fn = jax.jit(lambda q, k: select(q, k, config))
    sparse_fn = jax.jit(lambda q, k, v: sparse_attention(q, k, v, config))
    rows = []
    for length in lengths:
        q, k, v = (jnp.asarray(x[:length]) for x in (q_all, k_all, v_all))
        print(f"timing {length} tokens", file=sys.stderr, flush=True)
        dense_s = timed(dense_fn, q, k, v, repeats=args.repeats)
        select_s = timed(select_fn, q, k, repeats=args.repeats)
        sparse_s = timed(sparse_fn, q, k, v, repeats=args.repeats)
        density = float(select_fn(q, k).density(config.block_size))
        error = float(jnp.linalg.norm(sparse_fn(q, k, v) - dense_fn(q, k, v)) / jnp.linalg.norm(dense_fn(q, k, v)))
        rows.append(dict(tokens=length, dense_s=dense_s, sparse_s=sparse_s, select_s=select_s,
                         speedup=dense_s / sparse_s, density=density, rel_l2_error=error))
    print(f"{'tokens':>7} {'dense s':>8} {'sparse s':>9} {'(select)':>9} {'speedup':>8} {'density':>8} {'rel err':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['dense_s']:>8.3f} {r['sparse_s']:>9.3f} {r['select_s']:>9.3f} "
              f"{r['speedup']:>7.2f}x {r['density']:>8.3f} {r['rel_l2_error']:>8.4f}")
    return rows


def bench_prefill(args, loaded) -> list[dict]:
    from jaxinfer.engine.engine import Engine
    from jaxinfer.sampling_params import SamplingParams

    ids = long_text_ids(loaded.tokenizer, args.length)
    unisparse = UniSparseConfig(block_size=args.block_size, c_q=args.c_q, c_k=args.c_k, c_h=args.c_h, tau=args.tau)
    rows = []
    for mode in args.modes.split(","):
        config = EngineConfig(
            cache=CacheConfig(page_size=16, kv_memory_gib=1.0, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=args.chunk),
            sparse_prefill=SparsePrefillConfig(mode=mode, min_len=args.min_len, unisparse=unisparse))
        engine = Engine(loaded.model, loaded.tokenizer, config)
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        times = []
        for repeat in range(args.repeats + 1):  # the first run compiles
            print(f"{mode}: run {repeat + 1}/{args.repeats + 1}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            engine.generate([ids], params)
            if repeat:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append(dict(mode=mode, tokens=args.length, chunk=args.chunk, seconds=seconds,
                         prefill_tok_s=args.length / seconds))
        del engine
    print(f"{'backend':>14} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for r in rows:
        print(f"{r['mode']:>14} {r['tokens']:>7} {r['seconds']:>8.2f} {r['prefill_tok_s']:>8.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attention", "prefill"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="4096,8192,16384,32768", help="attention: token counts")
    parser.add_argument("--layer", type=int, default=15, help="attention: layer whose q/k/v are used")
    parser.add_argument("--length", type=int, default=8000, help="prefill: prompt tokens")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill: max_num_batched_tokens")
    parser.add_argument("--modes", default="off,dense_blocked,sparse", help="prefill: backends")
    parser.add_argument("--min-len", type=int, default=4096, help="prefill: sparse_min_len")
    parser.add_argument("--block-size", type=int, default=UniSparseConfig().block_size)
    parser.add_argument("--c-q", type=int, default=UniSparseConfig().c_q)
    parser.add_argument("--c-k", type=int, default=UniSparseConfig().c_k)
    parser.add_argument("--c-h", type=int, default=UniSparseConfig().c_h)
    parser.add_argument("--tau", type=float, default=UniSparseConfig().tau)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    loaded = load_model(args.model)
    rows = bench_attention(args, loaded) if args.what == "attention" else bench_prefill(args, loaded)
    if args.json:
        meta = dict(machine="2-core EPYC VM, CPU, float32", date=time.strftime("%Y-%m-%d"), args=vars(args))
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
