"""Accuracy of UniSparse sparse prefill on the real model (SmolLM2-135M, context 8192), dense vs sparse.

    python profiling/eval_unisparse_accuracy.py [--lengths 2048,4096,8192] [--windows 2] [--tau 0.9]
        [--block-size 64] [--c-q 8] [--c-k 8] [--sink-blocks 1] [--local-blocks 1] [--max-blocks 0]
        [--no-share-kv-heads] [--skip-ppl] [--skip-fidelity] [--skip-passkey] [--out FILE]

Both paths run the model's own modules over the whole sequence in one jitted forward; only the attention
differs: ``dense_attention(impl="xla")`` or ``sparse_attention(impl="xla")`` (selection on the layer's own
q/k, as the engine's prefill does).

1. Perplexity: non-overlapping windows of each length from the Paul Graham essays followed by the two books
   (data/longtext of the shared data folder; without it jaxinfer's own sources), evenly spaced over the
   stream; dense vs sparse perplexity and the relative increase (goal: <= 1% at every length).
2. Attention fidelity per layer (first window of 8192 and of 4096 tokens): with the dense model's hidden
   states as the layer input, the relative L2 error of the sparse attention output (before and after
   o_proj), the share of the dense softmax mass on the kept blocks (on a subsample of query rows per block)
   and the density (kept / causal blocks).
3. Passkey retrieval: a 5-digit key at depths 10/50/90% of essay text (prompts ~4K and ~8K tokens); prefill
   dense or sparse, then greedy decode with dense attention over the prefill's K/V (as the engine decodes).
4. Density per length from the sparse forwards, averaged over layers and windows.

Prints tables to stdout and progress to stderr; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import random
import re
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import UniSparseConfig
from jaxinfer.datasets import long_texts
from jaxinfer.layers.rotary import inverse_frequencies
from jaxinfer.loader import DEFAULT_MODEL, load_model
from pallas_kernels.unisparse import dense_attention, select, sparse_attention

REPO = Path(__file__).resolve().parent.parent
NLL_CHUNK = 512  # LM-head rows per step of the NLL loop: [512, V] f32 logits at a time
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- data -----------------------------------------------------------------------------------------------------


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """Documents tokenized without special tokens, joined by a blank line."""
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + sep
    return stream


def windows_of(stream: list[int], prefix: list[int], length: int, count: int) -> list[np.ndarray]:
    """``count`` non-overlapping windows of ``length`` tokens (prefix = what the tokenizer prepends, e.g. BOS),
    their starts evenly spaced from the stream's start to its end."""
    body = length - len(prefix)
    if count * body > len(stream):
        raise ValueError(f"{count} windows of {length} tokens need {count * body} tokens, the text has {len(stream)}")
    starts = [i * (len(stream) - body) // max(count - 1, 1) for i in range(count)]
    return [np.asarray(prefix + stream[s:s + body], np.int32) for s in starts]


# -- model ----------------------------------------------------------------------------------------------------


def lm_head_weight(model) -> jax.Array:
    """[V, E]: the tied embedding, or the untied head's kernel transposed."""
    if model.lm_head is None:
        return model.embed_tokens[...]
    return model.lm_head.kernel[...].T


def captured_mass(q, k, mask, block_size: int, rows_per_block: int):
    """Share of each sampled query row's dense softmax mass on its kept key blocks: [Nq, H, rows].

    q [T, H, D], k [T, K, D] (positions 0..T-1), mask [H, Nq, Nk] (kept blocks per query head). Samples
    ``rows_per_block`` evenly spaced rows per query block, the block's last row included.
    """
    t, h, d = q.shape
    kv_heads = k.shape[1]
    s = block_size
    nq = t // s
    offsets = np.arange(1, rows_per_block + 1) * (s // rows_per_block) - 1  # [R]
    q_rows = q.reshape(nq, s, kv_heads, h // kv_heads, d)[:, offsets].astype(jnp.float32)  # [Nq, R, K, G, D]
    kf = k.astype(jnp.float32)
    key_pos = jnp.arange(t)
    scale = 1.0 / math.sqrt(d)

    def per_block(args):
        rows, block_mask, block = args  # [R, K, G, D], [H, Nk], ()
        logits = jnp.einsum("rkgd,tkd->kgrt", rows, kf) * scale  # [K, G, R, T]
        query_pos = block * s + offsets
        logits = jnp.where(key_pos[None, :] <= query_pos[:, None], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).reshape(h, rows_per_block, nq, s).sum(-1)  # [H, R, Nk]
        return (probs * block_mask[:, None, :]).sum(-1)  # [H, R]

    return jax.lax.map(per_block, (q_rows, mask.transpose(1, 0, 2), jnp.arange(nq)))


def make_forward(graphdef, config, cfg: UniSparseConfig, mode: str, rows_per_block: int):
    """Jitted full-sequence forward. mode: 'dense', 'sparse', or 'fidelity' (dense, plus per-layer stats of
    the sparse path computed on the dense hidden states).

    (state, tokens [T], n_real) -> dict: nll (sum over targets before n_real), count, next-token logits at
    n_real - 1, per-layer K/V [L, T, K, D] (for decoding) and per-layer stats.
    """
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    bs = cfg.block_size

    def forward(state, tokens, n_real):
        model = nnx.merge(graphdef, state)
        t = tokens.shape[0]
        positions = jnp.arange(t, dtype=jnp.int32)
        x = model.embed_tokens[...][tokens].astype(jnp.float32)
        ks, vs, stats = [], [], []
        for layer in model.layers:
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), positions, inv_freq)
            ks.append(k)
            vs.append(v)
            if mode == "sparse":
                selection = select(q, k, cfg, impl="xla")
                out = sparse_attention(q, k, v, cfg, impl="xla", selection=selection)
                stats.append({"density": selection.density(bs)})
            else:
                out = dense_attention(q, k, v, bs, impl="xla")
            attn_out = attn.o_proj(out.reshape(t, -1).astype(x.dtype))
            if mode == "fidelity":
                selection = select(q, k, cfg, impl="xla")
                sparse_out = sparse_attention(q, k, v, cfg, impl="xla", selection=selection)
                sparse_o = attn.o_proj(sparse_out.reshape(t, -1).astype(x.dtype))
                mass = captured_mass(q, k, selection.per_query_head(q.shape[1]).mask, bs, rows_per_block)
                stats.append({
                    "rel_err": jnp.linalg.norm(sparse_out - out) / jnp.linalg.norm(out),
                    "rel_err_o_proj": jnp.linalg.norm(sparse_o - attn_out) / jnp.linalg.norm(attn_out),
                    "mass": mass.mean(),
                    "mass_min_head": mass.mean(axis=(0, 2)).min(),
                    "mass_p05_row": jnp.percentile(mass, 5.0),
                    "density": selection.density(bs),
                })
            x = x + attn_out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = model.norm(x)
        head = lm_head_weight(model)
        # NLL of tokens[i + 1] given the prefix up to i, for i < n_real - 1; chunked over rows
        targets = jnp.concatenate([tokens[1:], tokens[:1]])
        weights = (positions < n_real - 1).astype(jnp.float32)
        chunk = min(NLL_CHUNK, t)

        def nll_chunk(args):
            rows, target, weight = args
            logits = jnp.einsum("ne,ve->nv", rows.astype(head.dtype), head, preferred_element_type=jnp.float32)
            picked = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
            return ((jax.nn.logsumexp(logits, axis=-1) - picked) * weight).sum()

        nll = jax.lax.map(nll_chunk, (x.reshape(-1, chunk, x.shape[-1]), targets.reshape(-1, chunk),
                                      weights.reshape(-1, chunk))).sum()
        last = jax.lax.dynamic_index_in_dim(x, n_real - 1, keepdims=False)
        next_logits = jnp.einsum("e,ve->v", last.astype(head.dtype), head, preferred_element_type=jnp.float32)
        return {"nll": nll, "count": weights.sum(), "next_logits": next_logits, "k": jnp.stack(ks),
                "v": jnp.stack(vs), "stats": jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else {}}

    return jax.jit(forward)


def make_decode_step(graphdef, config):
    """Jitted one-token decode with dense attention over the cache: (state, token, pos, k, v) ->
    (logits [V], k, v), k/v [L, T, K, D] with this token's K/V written at pos."""
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    def step(state, token, pos, k_cache, v_cache):
        model = nnx.merge(graphdef, state)
        x = model.embed_tokens[...][token][None].astype(jnp.float32)  # [1, E]
        positions = pos[None]
        key_pos = jnp.arange(k_cache.shape[1])
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), positions, inv_freq)  # [1, H, D], [1, K, D]
            k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (index, pos, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (index, pos, 0, 0))
            kv_heads, d = k.shape[1], k.shape[2]
            qg = q[0].reshape(kv_heads, -1, d).astype(jnp.float32)  # [K, G, D]
            logits = jnp.einsum("kgd,tkd->kgt", qg, k_cache[index].astype(jnp.float32)) / math.sqrt(d)
            probs = jax.nn.softmax(jnp.where(key_pos <= pos, logits, -jnp.inf), axis=-1)
            out = jnp.einsum("kgt,tkd->kgd", probs, v_cache[index].astype(jnp.float32))
            x = x + attn.o_proj(out.reshape(1, -1).astype(x.dtype))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = model.norm(x)
        head = lm_head_weight(model)
        logits = jnp.einsum("ne,ve->nv", x.astype(head.dtype), head, preferred_element_type=jnp.float32)[0]
        return logits, k_cache, v_cache

    return jax.jit(step, donate_argnums=(3, 4))


class Runner:
    """Compiled forwards per (mode, length), created on first use."""

    def __init__(self, loaded, cfg: UniSparseConfig, rows_per_block: int):
        self.graphdef, self.state = nnx.split(loaded.model)
        self.config = loaded.config
        self.cfg = cfg
        self.rows_per_block = rows_per_block
        self.forwards: dict = {}
        self.decode = make_decode_step(self.graphdef, self.config)

    def forward(self, mode: str, tokens: np.ndarray, n_real: int | None = None) -> dict:
        if mode not in self.forwards:
            self.forwards[mode] = make_forward(self.graphdef, self.config, self.cfg, mode, self.rows_per_block)
        n_real = len(tokens) if n_real is None else n_real
        start = time.perf_counter()
        out = self.forwards[mode](self.state, jnp.asarray(tokens), jnp.int32(n_real))
        out = jax.block_until_ready(out)
        log(f"  {mode} forward of {len(tokens)} tokens: {time.perf_counter() - start:.1f} s")
        return out

    def greedy(self, out: dict, n_real: int, new_tokens: int) -> list[int]:
        """Greedy continuation after a prefill's output (its K/V cache and next-token logits)."""
        if n_real + new_tokens > out["k"].shape[1]:
            raise ValueError("the prefill's cache has no room for the new tokens")
        k_cache, v_cache = out["k"], out["v"]
        token = int(jnp.argmax(out["next_logits"]))
        generated = [token]
        for i in range(new_tokens - 1):
            logits, k_cache, v_cache = self.decode(self.state, jnp.int32(token), jnp.int32(n_real + i),
                                                   k_cache, v_cache)
            token = int(jnp.argmax(logits))
            generated.append(token)
        return generated


# -- measurements ---------------------------------------------------------------------------------------------


def run_perplexity(runner: Runner, windows: dict[int, list[np.ndarray]], fidelity_lengths: set[int]):
    """Dense and sparse NLL per window; the first window of a fidelity length runs the 'fidelity' forward
    (dense NLL plus per-layer stats). Returns (per-length results, fidelity per length)."""
    results, fidelity = {}, {}
    for length, wins in windows.items():
        rows = []
        for index, tokens in enumerate(wins):
            log(f"length {length} window {index + 1}/{len(wins)}")
            fid = index == 0 and length in fidelity_lengths
            dense = runner.forward("fidelity" if fid else "dense", tokens)
            if fid:
                fidelity[length] = {k: np.asarray(v).tolist() for k, v in dense["stats"].items()}
            sparse = runner.forward("sparse", tokens)
            rows.append({"dense_nll": float(dense["nll"]), "sparse_nll": float(sparse["nll"]),
                         "tokens": float(dense["count"]),
                         "density_per_layer": np.asarray(sparse["stats"]["density"]).tolist()})
            del dense, sparse
        count = sum(r["tokens"] for r in rows)
        dense_ppl = math.exp(sum(r["dense_nll"] for r in rows) / count)
        sparse_ppl = math.exp(sum(r["sparse_nll"] for r in rows) / count)
        density = float(np.mean([r["density_per_layer"] for r in rows]))
        results[length] = {"windows": rows, "dense_ppl": dense_ppl, "sparse_ppl": sparse_ppl,
                           "rel_increase_pct": 100.0 * (sparse_ppl / dense_ppl - 1.0), "density": density,
                           "density_per_layer": np.mean([r["density_per_layer"] for r in rows], axis=0).tolist()}
    return results, fidelity


def run_fidelity_only(runner: Runner, windows: dict[int, list[np.ndarray]], lengths: list[int]) -> dict:
    fidelity = {}
    for length in lengths:
        log(f"fidelity at {length}")
        out = runner.forward("fidelity", windows[length][0])
        fidelity[length] = {k: np.asarray(v).tolist() for k, v in out["stats"].items()}
    return fidelity


def passkey_prompt(tokenizer, haystack: list[int], prefix: list[int], key: str, depth: float,
                   n_real: int) -> np.ndarray:
    """Exactly n_real tokens: intro, essay text with the key sentence at ``depth``, question."""
    intro = tokenizer.encode("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize "
                             "it. I will quiz you about the pass key.\n\n", add_special_tokens=False)
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                              add_special_tokens=False)
    question = tokenizer.encode("\n\nWhat is the pass key? The pass key is", add_special_tokens=False)
    fill = n_real - len(prefix) - len(intro) - len(needle) - len(question)
    text = haystack[:fill]
    cut = int(depth * fill)
    # move the cut to just after the next sentence end, when there is one close by
    for i in range(cut, min(cut + 200, fill)):
        if tokenizer.decode([text[i]]).rstrip().endswith((".", "?", "!")):
            cut = i + 1
            break
    tokens = prefix + intro + text[:cut] + needle + text[cut:] + question
    assert len(tokens) == n_real
    return np.asarray(tokens, np.int32)


def run_passkey(runner: Runner, tokenizer, haystack: list[int], prefix: list[int], lengths: list[int],
                depths: list[float], new_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        n_real = length - runner.cfg.block_size  # the last block is padding; decode writes into it
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            prompt = np.zeros(length, np.int32)
            prompt[:n_real] = passkey_prompt(tokenizer, haystack, prefix, key, depth, n_real)
            case = {"length": length, "prompt_tokens": n_real, "depth": depth, "key": key}
            for mode in ("dense", "sparse"):
                log(f"passkey {length} depth {depth:.0%} {mode}")
                out = runner.forward(mode, prompt, n_real)
                ids = runner.greedy(out, n_real, new_tokens)
                del out
                text = tokenizer.decode(ids)
                number = re.search(r"\d+", text.replace(" ", ""))
                case[mode] = {"text": text, "ids": ids, "retrieved": bool(number and number.group() == key)}
            case["match"] = case["dense"]["ids"] == case["sparse"]["ids"]
            cases.append(case)
    return cases


# -- report ---------------------------------------------------------------------------------------------------


def print_tables(report: dict) -> None:
    cfg = report["config"]
    print(f"UniSparse accuracy on {report['model']}: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    ppl = report.get("perplexity")
    if ppl:
        print("\n== Perplexity (dense vs sparse prefill) ==")
        print(f"{'length':>7} {'windows':>7} {'tokens':>8} {'dense ppl':>10} {'sparse ppl':>10} {'increase':>9} "
              f"{'density':>8}  goal <= 1%")
        for length, r in ppl.items():
            ok = "ok" if r["rel_increase_pct"] <= 1.0 else "MISSED"
            print(f"{length:>7} {len(r['windows']):>7} {sum(w['tokens'] for w in r['windows']):>8.0f} "
                  f"{r['dense_ppl']:>10.4f} {r['sparse_ppl']:>10.4f} {r['rel_increase_pct']:>+8.3f}% "
                  f"{r['density']:>8.3f}  {ok}")
    for length, fid in report.get("fidelity", {}).items():
        print(f"\n== Attention fidelity per layer, {length}-token window (dense hidden states as input) ==")
        print(f"{'layer':>5} {'rel err':>8} {'err o_proj':>10} {'mass':>7} {'min head':>8} {'p05 row':>8} "
              f"{'density':>8}")
        keys = ("rel_err", "rel_err_o_proj", "mass", "mass_min_head", "mass_p05_row", "density")
        for layer in range(len(fid["rel_err"])):
            vals = [fid[k][layer] for k in keys]
            print(f"{layer:>5} {vals[0]:>8.4f} {vals[1]:>10.4f} {vals[2]:>7.4f} {vals[3]:>8.4f} {vals[4]:>8.4f} "
                  f"{vals[5]:>8.3f}")
        means = [float(np.mean(fid[k])) for k in keys]
        print(f"{'mean':>5} {means[0]:>8.4f} {means[1]:>10.4f} {means[2]:>7.4f} {means[3]:>8.4f} {means[4]:>8.4f} "
              f"{means[5]:>8.3f}")
    cases = report.get("passkey")
    if cases:
        print("\n== Passkey retrieval (greedy decode, dense decode attention over the prefill's K/V) ==")
        print(f"{'prompt':>6} {'depth':>5} {'key':>6} {'dense':>5} {'sparse':>6} {'match':>5}  dense answer | "
              "sparse answer")
        for c in cases:
            print(f"{c['prompt_tokens']:>6} {c['depth']:>5.0%} {c['key']:>6} {str(c['dense']['retrieved']):>5} "
                  f"{str(c['sparse']['retrieved']):>6} {str(c['match']):>5}  {c['dense']['text']!r} | "
                  f"{c['sparse']['text']!r}")
        dense_ok = sum(c["dense"]["retrieved"] for c in cases)
        sparse_ok = sum(c["sparse"]["retrieved"] for c in cases)
        matches = sum(c["match"] for c in cases)
        print(f"retrieved: dense {dense_ok}/{len(cases)}, sparse {sparse_ok}/{len(cases)}; "
              f"identical answers {matches}/{len(cases)}")
    if ppl:
        print("\n== Density (kept / causal blocks) of the sparse forwards ==")
        print(f"{'length':>7} {'mean':>7} {'min layer':>9} {'max layer':>9}")
        for length, r in ppl.items():
            per_layer = r["density_per_layer"]
            print(f"{length:>7} {r['density']:>7.3f} {min(per_layer):>9.3f} {max(per_layer):>9.3f}")
    print(f"\nwall time {report['wall_s']:.0f} s, peak RSS {report['peak_rss_gib']:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--lengths", default="2048,4096,8192", help="perplexity window lengths (block multiples)")
    parser.add_argument("--windows", type=int, default=2, help="perplexity windows per length")
    parser.add_argument("--fidelity-lengths", default="4096,8192",
                        help="lengths whose first window gets the per-layer fidelity stats (must be in --lengths "
                             "unless --skip-ppl)")
    parser.add_argument("--mass-rows", type=int, default=16, help="query rows sampled per block for the mass")
    parser.add_argument("--passkey-lengths", default="4096,8192", help="passkey prompt sizes (prompt = size - block)")
    parser.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens decoded per passkey case")
    parser.add_argument("--seed", type=int, default=0)
    defaults = UniSparseConfig()
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--c-q", type=int, default=defaults.c_q)
    parser.add_argument("--c-k", type=int, default=defaults.c_k)
    parser.add_argument("--c-h", type=int, default=defaults.c_h)
    parser.add_argument("--tau", type=float, default=defaults.tau)
    parser.add_argument("--sink-blocks", type=int, default=defaults.sink_blocks)
    parser.add_argument("--local-blocks", type=int, default=defaults.local_blocks)
    parser.add_argument("--max-blocks", type=int, default=defaults.max_blocks)
    parser.add_argument("--no-share-kv-heads", action="store_true", help="one selection per query head")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-passkey", action="store_true")
    parser.add_argument("--out", default=str(REPO / "profiling" / "results" / "unisparse_accuracy.json"))
    args = parser.parse_args()

    cfg = UniSparseConfig(block_size=args.block_size, c_q=args.c_q, c_k=args.c_k, c_h=args.c_h, tau=args.tau,
                          sink_blocks=args.sink_blocks, local_blocks=args.local_blocks, max_blocks=args.max_blocks,
                          share_kv_heads=not args.no_share_kv_heads)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    fidelity_lengths = [] if args.skip_fidelity else [int(x) for x in args.fidelity_lengths.split(",") if x]
    passkey_lengths = [int(x) for x in args.passkey_lengths.split(",") if x]
    for length in set(lengths + fidelity_lengths + passkey_lengths):
        if length % cfg.block_size or (length > NLL_CHUNK and length % NLL_CHUNK):
            raise SystemExit(f"length {length} must be a multiple of the block size and of {NLL_CHUNK}")
    if args.block_size % args.mass_rows:
        raise SystemExit("--mass-rows must divide the block size")

    loaded = load_model(args.model, "float32")  # the head and embedding are read as float tables below
    tokenizer = loaded.tokenizer
    log(f"loaded {args.model} ({loaded.load_seconds:.1f} s); {cfg}")
    prefix = tokenizer.encode("")  # what the tokenizer adds in front of a text (BOS or nothing)
    texts, source = long_texts()
    stream = token_stream(tokenizer, texts)
    log(f"text: {len(stream)} tokens of {source}; tokenizer prefix {prefix}")
    window_lengths = sorted(set(lengths) | set(fidelity_lengths))
    windows = {n: windows_of(stream, prefix, n, args.windows if n in lengths else 1) for n in window_lengths}
    runner = Runner(loaded, cfg, args.mass_rows)

    report: dict = {"model": args.model, "config": dataclasses.asdict(cfg),
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "data": f"{source} (essays in name order, then Alice and Jekyll), windows evenly spaced "
                            f"over {len(stream)} tokens; tokenizer prefix {prefix}"}
    if not args.skip_ppl:
        ppl, fidelity = run_perplexity(runner, {n: windows[n] for n in lengths}, set(fidelity_lengths))
        report["perplexity"] = {str(n): r for n, r in ppl.items()}
        missing = [n for n in fidelity_lengths if n not in fidelity]
        fidelity.update(run_fidelity_only(runner, windows, missing))
    else:
        fidelity = run_fidelity_only(runner, windows, fidelity_lengths)
    if fidelity:
        report["fidelity"] = {str(n): fidelity[n] for n in sorted(fidelity)}
        report["fidelity_mass_rows_per_block"] = args.mass_rows
    if not args.skip_passkey:
        depths = [float(x) for x in args.passkey_depths.split(",") if x]
        report["passkey"] = run_passkey(runner, tokenizer, stream, prefix, passkey_lengths, depths,
                                        args.new_tokens, args.seed)
    report["wall_s"] = time.perf_counter() - START
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print_tables(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
