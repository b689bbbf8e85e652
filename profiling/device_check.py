"""One-command check of the engine on an accelerator: the Pallas kernels compiled for it against their
references, the engine with the Pallas kernels against the engine with the jnp references, and the
speeds that matter, with the roofline they are held to. It writes one JSON and prints a short table.

    bash profiling/device_check.sh                 # on the GPU machine (installs with --no-deps, then this)
    python profiling/device_check.py --tiny        # anywhere: tiny shapes (on CPU the kernels interpret)

Stages (each timed; a failing stage is recorded and the rest still run; the exit code is 1 if any
check failed):
1. kernels: ragged paged attention, tree attention, UniSparse block scores and block-sparse
   attention, compiled (interpret mode on CPU) against the jnp references, float32 and bfloat16; and
   the Mosaic GPU bodies of block-sparse, ragged paged and tree attention (bfloat16; on CPU in the
   Mosaic GPU interpreter of jax >= 0.11, skipped under older jax).
2. engine: greedy tokens of a random-weight model with attention_impl=pallas equal those with
   attention_impl=reference; on a GPU also with the Mosaic GPU bodies (JAXINFER_GPU_BODY=mosaic).
3. speed: measured memory bandwidth (a device copy); decode tokens/s at batch 1/8/64 and prefill
   tokens/s of random-weight models of real shapes (Llama-3.2-1B and Llama-3.1-8B, bfloat16; the tiny
   model with --tiny) against the bandwidth roofline (weights plus KV read once per step); UniSparse
   against dense blocked attention (both Pallas) at 32K/64K/128K tokens, and against jax's own
   FlashAttention-3 for Hopper where it runs (1K/2K with --tiny, XLA path, no FA3).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SparsePrefillConfig,
    UniSparseConfig,
)
from jaxinfer.engine.engine import Engine
from jaxinfer.models import init_random, model_from_values, param_shapes, random_value
from jaxinfer.sampling_params import SamplingParams
from pallas_kernels._mgpu import interpret_params
from pallas_kernels.ragged_paged_attention import (
    BlockSizes,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.tree_attention import tree_attention, tree_attention_reference
from pallas_kernels.unisparse import dense_attention, sparse_attention
from pallas_kernels.unisparse.block_scores_kernel import block_scores_pallas
from pallas_kernels.unisparse.block_sparse_attention import block_sparse_attention
from pallas_kernels.unisparse.reference import block_scores, block_sparse_attention_reference, select_blocks

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# Hugging Face configs of the real models (their published config.json values that shape the compute)
REAL_MODELS = {
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         tie_word_embeddings=False, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}
TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
            rms_norm_eps=1e-5, max_position_embeddings=1024)
TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2}  # max |kernel - reference| over outputs of scale ~1


class IdTokenizer:
    """Token ids as text: the random-weight models have no vocabulary."""

    eos_ids = ()

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


@dataclasses.dataclass
class Sizes:
    """Problem sizes: tiny (CPU, CI) or real (an accelerator)."""

    tiny: bool

    def pick(self, tiny, real):
        return tiny if self.tiny else real


# -- 1. kernels ---------------------------------------------------------------------------------------------------


def _paged_inputs(rng, kv_lens, q_lens, *, kv_heads, group, head_dim, page, dtype):
    """q rows for each request's last q_len positions, KV pages in a shuffled pool, padded tables."""
    seqs = len(kv_lens)
    pages_per_seq = -(-max(kv_lens) // page) + 1
    pool = seqs * pages_per_seq + 2
    q = rng.normal(size=(sum(q_lens), kv_heads * group, head_dim)) / np.sqrt(head_dim)
    k = rng.normal(size=(kv_heads, pool, page, head_dim)) / np.sqrt(head_dim)
    v = rng.normal(size=(kv_heads, pool, page, head_dim))
    table = rng.permutation(pool)[:seqs * pages_per_seq].reshape(seqs, pages_per_seq)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(q), cast(k), cast(v), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table, jnp.int32),
            jnp.asarray(cu, jnp.int32), jnp.asarray([seqs], jnp.int32))


def _tree_inputs(rng, kv_lens, *, nodes, kv_heads, group, head_dim, page, dtype):
    seqs = len(kv_lens)
    pages_per_seq = -(-(max(kv_lens) + nodes) // page) + 1
    pool = seqs * pages_per_seq + 2
    q = rng.normal(size=(seqs, nodes, kv_heads * group, head_dim)) / np.sqrt(head_dim)
    k = rng.normal(size=(kv_heads, pool, page, head_dim)) / np.sqrt(head_dim)
    v = rng.normal(size=(kv_heads, pool, page, head_dim))
    table = rng.permutation(pool)[:seqs * pages_per_seq].reshape(seqs, pages_per_seq)
    mask = np.zeros((seqs, nodes, nodes), bool)
    for b in range(seqs):  # a random tree: each node sees itself and its ancestors
        mask[b] = np.eye(nodes, dtype=bool)
        for i in range(1, nodes):
            mask[b, i] |= mask[b, int(rng.integers(0, i))]
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(q), cast(k), cast(v), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table, jnp.int32),
            jnp.asarray(mask))


def _error(out, ref) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(out, jnp.float32) - jnp.asarray(ref, jnp.float32))))


def _unisparse_cases(rng, sizes: Sizes, head_dim: int, dtype, interpret: bool) -> list[tuple]:
    block, tokens = sizes.pick(16, 64), sizes.pick(64, 4096)
    config = UniSparseConfig(local_blocks=1, c_h=1, block_size=block, c_q=4, c_k=4, tau=0.6)
    q = jnp.asarray(rng.normal(size=(tokens, 8, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(tokens, 2, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(tokens, 2, head_dim)), dtype)
    mask, indices, counts = select_blocks(block_scores(q, k, config), config)
    cases = [("unisparse_block_scores", lambda: block_scores_pallas(q, k, config, interpret=interpret),
              lambda: block_scores(q, k, config)),
             ("unisparse_block_sparse_attention",
              lambda: block_sparse_attention(q, k, v, indices, counts, block_size=block, interpret=interpret),
              lambda: block_sparse_attention_reference(q, k, v, mask, block))]
    mosaic = interpret_params() if interpret else False  # compiled on a GPU; its interpreter on CPU (jax >= 0.11)
    if jnp.dtype(dtype) == jnp.bfloat16 and mosaic is not None:
        cases += _mosaic_gpu_cases(rng, sizes, mosaic)
    return cases


def _mosaic_gpu_cases(rng, sizes: Sizes, interpret) -> list[tuple]:
    """The Mosaic GPU bodies (opt-in until this check passes on a GPU): bfloat16, tiles of 64."""
    tokens, head_dim = sizes.pick(128, 4096), sizes.pick(64, 128)
    config = UniSparseConfig(local_blocks=1, c_h=1, block_size=64, c_q=4, c_k=4, tau=0.6)
    q, k, v = (jnp.asarray(rng.normal(size=(tokens, heads, head_dim)), jnp.bfloat16) for heads in (8, 2, 2))
    mask, indices, counts = select_blocks(block_scores(q, k, config), config)
    shape = dict(kv_heads=2, group=4, head_dim=head_dim, page=16, dtype=jnp.bfloat16)
    paged = _paged_inputs(rng, sizes.pick([9, 1, 70, 33], [1000, 1, 4095, 257, 64, 2048, 17, 513]),
                          sizes.pick([9, 1, 4, 1], [200, 1, 1, 64, 1, 128, 17, 1]), **shape)
    tree = _tree_inputs(rng, sizes.pick([5, 70], [700, 3000, 64, 1]), nodes=16, **shape)
    blocks = BlockSizes(block_q=16, pages_per_block=4)
    return [("unisparse_block_sparse_attention_mosaic_gpu",
             lambda: block_sparse_attention(q, k, v, indices, counts, block_size=64, interpret=interpret,
                                            gpu_body="mosaic"),
             lambda: block_sparse_attention_reference(q, k, v, mask, 64)),
            ("ragged_paged_attention_mosaic_gpu",
             lambda: ragged_paged_attention(*paged, block_sizes=blocks, interpret=interpret, gpu_body="mosaic"),
             lambda: ragged_paged_attention_reference(*paged)),
            ("tree_attention_mosaic_gpu",
             lambda: tree_attention(*tree, pages_per_block=4, interpret=interpret, gpu_body="mosaic"),
             lambda: tree_attention_reference(*tree))]


def check_kernels(sizes: Sizes, interpret: bool) -> list[dict]:
    rows = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = jnp.dtype(dtype_name)
        rng = np.random.default_rng(0)
        shape = dict(kv_heads=2, group=sizes.pick(2, 4), head_dim=sizes.pick(16, 128), page=sizes.pick(8, 16),
                     dtype=dtype)
        kv_lens = sizes.pick([9, 1, 30, 17], [1000, 1, 4095, 257, 64, 2048, 17, 513])
        q_lens = sizes.pick([9, 1, 4, 1], [200, 1, 1, 64, 1, 128, 17, 1])
        args = _paged_inputs(rng, kv_lens, q_lens, **shape)
        cases = [("ragged_paged_attention", lambda a=args: ragged_paged_attention(*a, interpret=interpret),
                  lambda a=args: ragged_paged_attention_reference(*a))]
        tree = _tree_inputs(rng, sizes.pick([5, 20], [700, 3000, 64, 1]), nodes=sizes.pick(8, 16), **shape)
        cases.append(("tree_attention", lambda a=tree: tree_attention(*a, interpret=interpret),
                      lambda a=tree: tree_attention_reference(*a)))
        cases += _unisparse_cases(rng, sizes, shape["head_dim"], dtype, interpret)
        for name, kernel, reference in cases:
            error = _error(jax.jit(kernel)(), jax.jit(reference)())
            rows.append(dict(kernel=name, dtype=dtype_name, max_abs_error=error,
                             ok=bool(error <= TOLERANCE[dtype_name])))
    return rows


# -- 2. engine ----------------------------------------------------------------------------------------------------


def random_model(config: ModelConfig, dtype, seed: int = 0):
    """``init_random``'s weights drawn on the device instead (an 8B model's would take minutes in numpy)."""
    key = jax.random.key(seed)
    values = {}
    for index, (path, leaf) in enumerate(param_shapes(config, dtype).items()):
        noise = jax.random.normal(jax.random.fold_in(key, index), leaf.shape, jnp.float32)
        values[path] = random_value(path, leaf.shape, noise).astype(leaf.dtype)
    return model_from_values(config, values, dtype)


def engine_for(model, impl: str, decode_buckets: tuple[int, ...], prompt_len: int, max_len: int, page: int,
               kv_memory_gib: float) -> Engine:
    """An engine with few step shapes (each compiles once on first use: on a GPU a real-size model's
    compiles dominate the check's time) and no prefix cache (repeated prompts are timed again)."""
    max_num_seqs = max(decode_buckets)
    scheduler = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_len,
                                max_num_batched_tokens=max(prompt_len, max_num_seqs), decode_buckets=decode_buckets,
                                prefill_buckets=(prompt_len,), kv_buckets=(max_len,), max_waiting=4096)
    config = EngineConfig(cache=CacheConfig(page_size=page, kv_memory_gib=kv_memory_gib, enable_prefix_caching=False),
                          scheduler=scheduler, attention_impl=impl, sparse_prefill=SparsePrefillConfig(mode="off"))
    return Engine(model, IdTokenizer(), config)


def check_engine(sizes: Sizes) -> dict:
    # Llama-3.2-1B's heads, widths and vocabulary in 2 layers: the kernels see real shapes, compiles stay short
    config = ModelConfig.from_hf(TINY if sizes.tiny else {**REAL_MODELS["llama-3.2-1b"], "num_hidden_layers": 2})
    dtype = jnp.float32 if sizes.tiny else jnp.bfloat16
    model = init_random(config, seed=3, scale=2.0) if sizes.tiny else random_model(config, dtype, seed=3)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in sizes.pick((5, 17, 30), (100, 7, 300))]
    params = SamplingParams(max_tokens=sizes.pick(8, 32), ignore_eos=True)
    outputs = {}
    # on a GPU also the Mosaic GPU bodies (JAXINFER_GPU_BODY is read when a step is traced); the tiny
    # model's head_dim 16 is below their tiles of 64
    runs = (("pallas", "triton"), ("reference", "triton")) + (() if sizes.tiny else (("pallas", "mosaic"),))
    for impl, body in runs:
        name = impl if body == "triton" else f"{impl} ({body} GPU bodies)"
        with _gpu_body(body):
            engine = engine_for(model, impl, (4,), sizes.pick(32, 512), sizes.pick(64, 1024), sizes.pick(8, 16), 0.5)
            outputs[name] = [o.output_ids for o in engine.generate(prompts, params)]
    same = {name: [a == b for a, b in zip(out, outputs["reference"], strict=True)]
            for name, out in outputs.items() if name != "reference"}
    return dict(model="tiny" if sizes.tiny else "llama-3.2-1b shapes, 2 layers (random weights, bfloat16)",
                requests=len(prompts), equal=same["pallas"], equal_by_run=same,
                ok=all(all(flags) for flags in same.values()))


@contextlib.contextmanager
def _gpu_body(body: str):
    previous = os.environ.get("JAXINFER_GPU_BODY")
    os.environ["JAXINFER_GPU_BODY"] = body
    try:
        yield
    finally:
        if previous is None:
            del os.environ["JAXINFER_GPU_BODY"]
        else:
            os.environ["JAXINFER_GPU_BODY"] = previous


# -- 3. speed -----------------------------------------------------------------------------------------------------


def timed(function: Callable, repeats: int = 5) -> float:
    """Median seconds of ``function()`` after one warm-up call."""
    jax.block_until_ready(function())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bandwidth(sizes: Sizes) -> float:
    """Bytes/s of a device copy, counting bytes read and written."""
    x = jnp.ones(sizes.pick(1 << 24, 1 << 30), jnp.uint8)
    copy = jax.jit(lambda a: a + jnp.uint8(1))
    return 2 * x.size / timed(lambda: copy(x))


def model_speed(name: str, sizes: Sizes, bytes_per_s: float) -> list[dict]:
    from jaxinfer.bench import run

    config = ModelConfig.from_hf(TINY if name == "tiny" else REAL_MODELS[name])
    dtype = jnp.float32 if sizes.tiny else jnp.bfloat16
    model = random_model(config, dtype)
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
    prompt_len, output_len, long_prompt = sizes.pick(16, 128), sizes.pick(16, 128), sizes.pick(64, 2048)
    batches = sizes.pick((1, 8), (1, 8, 64))
    engine = engine_for(model, "auto", batches, long_prompt, long_prompt + 16, sizes.pick(8, 16),
                        sizes.pick(0.25, 16.0))
    rows = []
    rng = np.random.default_rng(2)
    for batch in batches:
        params = [SamplingParams(max_tokens=output_len, ignore_eos=True)] * batch
        prompts = [rng.integers(3, config.vocab_size, size=prompt_len).tolist() for _ in range(batch)]
        run(engine, prompts, params)  # compiles this batch's shapes
        stats = run(engine, prompts, params)
        context = prompt_len + output_len / 2  # the mean context of a decode step
        kv_bytes = batch * context * config.num_layers * 2 * config.num_kv_heads * config.head_dim * \
            jnp.dtype(dtype).itemsize
        roofline = batch * bytes_per_s / (weight_bytes + kv_bytes)
        measured = stats.decode_tokens / stats.decode_seconds if stats.decode_seconds else float("nan")
        rows.append(dict(model=name, what=f"decode b{batch}", tok_s=measured, roofline_tok_s=roofline,
                         share_of_roofline=measured / roofline))
    one = SamplingParams(max_tokens=1)
    engine.generate([rng.integers(3, config.vocab_size, size=long_prompt).tolist()], one)  # compiles
    prompt = rng.integers(3, config.vocab_size, size=long_prompt).tolist()
    start = time.perf_counter()
    engine.generate([prompt], one)
    rows.append(dict(model=name, what=f"prefill {long_prompt}", tok_s=long_prompt / (time.perf_counter() - start)))
    return rows


def unisparse_speed(sizes: Sizes) -> list[dict]:
    impl = sizes.pick("xla", "pallas")
    block = sizes.pick(16, 64)
    config = UniSparseConfig(block_size=block)
    rows = []
    rng = jax.random.key(5)
    for tokens in sizes.pick((1024, 2048), (32768, 65536, 131072)):
        dtype = sizes.pick(jnp.float32, jnp.bfloat16)
        q, k, v = (jax.random.normal(jax.random.fold_in(rng, i), (tokens, heads, sizes.pick(16, 128)), dtype)
                   for i, heads in enumerate((32, 8, 8)))
        dense = functools.partial(jax.jit(lambda q, k, v: dense_attention(q, k, v, block, impl=impl)), q, k, v)
        sparse = functools.partial(jax.jit(lambda q, k, v: sparse_attention(q, k, v, config, impl=impl)), q, k, v)
        dense_s, sparse_s = timed(dense, 3), timed(sparse, 3)
        row = dict(tokens=tokens, impl=impl, dense_s=dense_s, sparse_s=sparse_s, speedup=dense_s / sparse_s)
        if not sizes.tiny:
            row.update(hopper_flash_attention(q, k, v, sparse_s))
        rows.append(row)
    return rows


def hopper_flash_attention(q, k, v, sparse_s: float) -> dict:
    """jax's own FlashAttention-3 for Hopper (Mosaic GPU, causal) on the same q/k/v: the strongest dense
    baseline there is on an H100/H200 (jax >= 0.11 with CUDA; recorded as an error elsewhere)."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=128, block_kv=128, max_concurrent_steps=2, causal=True)
        flash = functools.partial(jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, config)),
                                  q[None], k[None], v[None])
        flash_s = timed(flash, 3)
        return dict(flash3_s=flash_s, speedup_vs_flash3=flash_s / sparse_s)
    except Exception as exc:  # noqa: BLE001 - an optional baseline
        return dict(flash3_error=f"{type(exc).__name__}: {str(exc)[:300]}")


# -- driver -------------------------------------------------------------------------------------------------------


def stage(report: dict, name: str, function: Callable, deadline: float) -> None:
    """Run one stage into report[name]; past the deadline it is skipped (the run must end in its budget)."""
    start = time.perf_counter()
    if start > deadline:
        report[name] = {"skipped": "over the time budget (--budget-s)", "seconds": 0.0}
        print(f"[device_check] {name}: skipped, over the time budget", file=sys.stderr, flush=True)
        return
    print(f"[device_check] {name} ...", file=sys.stderr, flush=True)
    try:
        report[name] = {"result": function()}
    except Exception as exc:  # noqa: BLE001 - recorded; the other stages still run
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    report[name]["seconds"] = time.perf_counter() - start


def failed(report: dict) -> list[str]:
    bad = []
    for name, entry in report.items():
        if not isinstance(entry, dict):
            continue
        if "error" in entry:
            bad.append(name)
        elif name == "kernels" and not all(row["ok"] for row in entry["result"]):
            bad.append(name)
        elif name == "engine" and not entry["result"]["ok"]:
            bad.append(name)
    return bad


def print_table(report: dict) -> None:
    print(f"device: {report['device']} | jax {report['jax']} | {'tiny' if report['tiny'] else 'real'} shapes")
    for name, entry in report.items():
        if not isinstance(entry, dict) or not {"result", "error", "skipped"} & set(entry):
            continue
        if "skipped" in entry:
            print(f"{name:<20} skipped ({entry['skipped']})")
            continue
        if "error" in entry:
            print(f"{name:<20} ERROR {entry['error'][:200]}")
            continue
        result = entry["result"]
        if name == "kernels":
            for row in result:
                print(f"{'kernel':<20} {row['kernel']:<44} {row['dtype']:<9} max err {row['max_abs_error']:.2e} "
                      f"{'ok' if row['ok'] else 'FAIL'}")
        elif name == "engine":
            print(f"{'engine':<20} pallas == reference greedy: {result['ok']} ({result['model']}; runs: "
                  f"{', '.join(result['equal_by_run'])})")
        elif name == "bandwidth":
            print(f"{'bandwidth':<20} {result / 1e9:.1f} GB/s (copy, read + write)")
        elif name.startswith("speed_"):
            for row in result:
                roof = f" (roofline {row['roofline_tok_s']:.0f}, {100 * row['share_of_roofline']:.0f}%)" \
                    if "roofline_tok_s" in row else ""
                print(f"{name[6:]:<20} {row['what']:<14} {row['tok_s']:>10.1f} tok/s{roof}")
        elif name == "unisparse":
            for row in result:
                flash = f", FA3 {row['flash3_s'] * 1e3:.1f} ms" if "flash3_s" in row else ""
                print(f"{'unisparse':<20} {row['tokens']:>7} tokens dense {row['dense_s'] * 1e3:.1f} ms sparse "
                      f"{row['sparse_s'] * 1e3:.1f} ms ({row['speedup']:.2f}x, {row['impl']}){flash}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default on CPU)")
    parser.add_argument("--stages", default="kernels,engine,speed,unisparse")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no stage starts after this many seconds (the GPU lease is short)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "profiling" / "results"),
                        help="folder for device_check.json (default $OUT, else profiling/results)")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    sizes = Sizes(tiny=args.tiny or backend == "cpu")
    interpret = backend == "cpu"
    device = jax.devices()[0]
    report: dict = dict(device=f"{device.platform} {device.device_kind}", jax=jax.__version__, tiny=sizes.tiny,
                        interpret=interpret, python=platform.python_version(),
                        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    stages = args.stages.split(",")
    deadline = time.perf_counter() + args.budget_s
    models = sizes.pick(("tiny",), ("llama-3.2-1b", "llama-3.1-8b"))
    if "kernels" in stages:
        stage(report, "kernels", lambda: check_kernels(sizes, interpret), deadline)
    if "engine" in stages:
        stage(report, "engine", lambda: check_engine(sizes), deadline)
    if "speed" in stages:
        stage(report, "bandwidth", lambda: bandwidth(sizes), deadline)
        bytes_per_s = report["bandwidth"].get("result") or float("nan")
        stage(report, f"speed_{models[0]}", lambda: model_speed(models[0], sizes, bytes_per_s), deadline)
    if "unisparse" in stages:
        stage(report, "unisparse", lambda: unisparse_speed(sizes), deadline)
    if "speed" in stages:  # the largest model last: its compiles are the longest
        for name in models[1:]:
            stage(report, f"speed_{name}", lambda name=name: model_speed(name, sizes, bytes_per_s), deadline)
    bad = failed(report)
    report["failed"] = bad
    report["skipped"] = [name for name, entry in report.items() if isinstance(entry, dict) and "skipped" in entry]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    print_table(report)
    skipped = f" ({len(report['skipped'])} stages skipped: over the time budget)" if report["skipped"] else ""
    print(f"wrote {out / 'device_check.json'}; {'FAILED: ' + ', '.join(bad) if bad else 'all checks passed'}{skipped}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
