"""Speculative decoding benchmark: plain decoding vs n-gram, EAGLE (fixed tree) and HeteroSpec on the
held-out prompt sets (MT-Bench first turns, GSM8K test lines [660, 1319)), at batch 1 and 4,
temperature 0 and 1; and the speed-up as a function of the verify budget.

    JAXINFER_CACHE=/tmp/jicache PYTHONPATH=. python profiling/bench_spec.py --json profiling/results/spec.json

Per configuration: output tokens/s end to end (compile time excluded), the speed-up over plain
decoding of the same prompts, tau (tokens emitted per request-round: accepted drafts + 1), target
calls (engine steps) and verified tokens (tree nodes through the target, roots included; plain: one
per decoded token). The outputs are checked against plain decoding: equal token for token, at
temperature 1 too (every request has a seed, and a round draws each emitted token with the key
plain decoding would use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from jaxinfer.datasets import PromptSet, prompt_set
from jaxinfer.engine.engine import Engine
from jaxinfer.loader import DEFAULT_MODEL, load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.draft_head import prepare_speculative

HELD_OUT_START = {"mt_bench": 0, "gsm8k": 660, "humaneval": 0}  # GSM8K test lines before 660 train draft heads


def held_out_prompts(dataset: str, count: int) -> PromptSet:
    """The held-out prompts of a set: the shared data folder's, else jaxinfer's builtin stand-ins."""
    if dataset not in HELD_OUT_START:
        raise ValueError(f"unknown dataset {dataset!r} (known: {', '.join(HELD_OUT_START)})")
    return prompt_set(dataset, HELD_OUT_START[dataset], count)


def run(engine: Engine, prompts: list[list[int]], batch: int, temperature: float, max_tokens: int) -> dict:
    runner, spec = engine.runner, engine.spec
    compile_before, steps_before = runner.compile_seconds, engine.num_steps
    stats_before = dataclasses.replace(spec.stats) if spec is not None else None
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = []
    for first in range(0, len(prompts), batch):
        outputs += engine.generate(prompts[first:first + batch], params[first:first + batch])
    seconds = time.perf_counter() - start - (runner.compile_seconds - compile_before)
    generated = sum(len(o.output_ids) for o in outputs)
    result = dict(seconds=seconds, generated_tokens=generated, tokens_per_second=generated / seconds,
                  target_calls=engine.num_steps - steps_before, outputs=[o.output_ids for o in outputs])
    if spec is not None:
        s = spec.stats
        rounds, requests = s.rounds - stats_before.rounds, s.requests - stats_before.requests
        emitted = s.emitted_tokens - stats_before.emitted_tokens
        plain_decodes = generated - len(prompts) - emitted  # tokens decoded outside rounds (fallback steps)
        result.update(rounds=rounds, tau=emitted / requests if requests else 0.0,
                      verified_tokens=s.verified_tokens - stats_before.verified_tokens + max(plain_decodes, 0),
                      accepted_tokens=s.accepted_tokens - stats_before.accepted_tokens)
        if hasattr(spec.drafter, "bin_counts"):
            result["bin_counts"] = list(spec.drafter.bin_counts)
    else:
        result.update(rounds=0, tau=1.0, verified_tokens=generated - len(prompts), accepted_tokens=0)
    return result


def median_run(results: list[dict]) -> dict:
    """The run of median speed, with every run's tokens/s beside it."""
    ranked = sorted(results, key=lambda r: r["tokens_per_second"])
    return {**ranked[(len(ranked) - 1) // 2], "runs_tokens_per_second": [r["tokens_per_second"] for r in results]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto", help="weight format (jaxinfer.config.WEIGHT_DTYPES)")
    parser.add_argument("--methods", default="plain,ngram,eagle,heterospec")
    parser.add_argument("--datasets", default="mt_bench,gsm8k")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--depth", type=int, default=0, help="0: the draft head's tuned policy (else 4)")
    parser.add_argument("--top-k", type=int, default=SpeculativeConfig().top_k)
    parser.add_argument("--nodes", type=int, default=0, help="verify budget; 0: the tuned policy (else 16)")
    parser.add_argument("--budgets", default="", help="also sweep the verify budget (nodes) at batch 1, T=0, "
                                                      "e.g. 4,8,16,32 (first dataset)")
    parser.add_argument("--adaptive", action="store_true",
                        help="let the engine fall back to plain steps where rounds measure slower (default: off, "
                             "every eligible step is a round, which measures the method itself)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each grid cell, the methods taking turns; the median counts (this VM's "
                             "speed drifts by 5-10%% between runs)")
    parser.add_argument("--no-grid", action="store_true", help="only the verify-budget sweep")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    loaded = load_model(args.model, args.dtype)
    tokenizer = loaded.tokenizer
    # one KV bucket: prompts (< 400 tokens) plus outputs fit, and every method compiles few shapes
    scheduler = SchedulerConfig(max_num_seqs=4, max_model_len=1024, decode_buckets=(1, 2, 4),
                                prefill_buckets=(64, 128, 256), kv_buckets=(1024,))
    # many engines live at once: a small pool each; no prefix cache, so that every run of a prompt
    # prefills it whole (a cached prefix would make repeats, and the method run after a warm-up on the
    # same prompts, cheaper)
    cache = CacheConfig(kv_memory_gib=0.25, enable_prefix_caching=False)
    engines: dict[tuple[str, int], Engine] = {}

    def engine_for(method: str, nodes: int) -> Engine:
        if (method, nodes) not in engines:
            spec = SpeculativeConfig(method="off" if method == "plain" else method, depth=args.depth,
                                     top_k=args.top_k, num_nodes=nodes, adaptive=args.adaptive)
            spec, head = prepare_speculative(spec, args.model)
            engines[(method, nodes)] = Engine(loaded.model, tokenizer, EngineConfig(cache=cache, scheduler=scheduler,
                                                                                    speculative=spec), head)
        return engines[(method, nodes)]

    methods = [m for m in args.methods.split(",") if m != "plain"]  # the speculative ones; plain always runs
    rows = []
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()} {os.cpu_count()} cores",
                model=args.model, dtype=args.dtype, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                depth=args.depth, top_k=args.top_k, nodes=args.nodes, adaptive=args.adaptive, repeats=args.repeats,
                python=sys.version.split()[0], prompts={})
    header = (f"{'dataset':<9} {'B':>2} {'T':>3} {'method':<11} {'nodes':>5} {'tok/s':>7} {'speedup':>8} {'tau':>5} "
              f"{'calls':>6} {'verified':>9} {'equal':>6}")
    print(header)

    def report(row):
        rows.append(row)
        if args.json:  # written as it goes: a crash keeps what was measured
            Path(args.json).write_text(json.dumps(dict(meta=meta, rows=[
                {k: v for k, v in r.items() if k != "outputs"} for r in rows]), indent=1))
        print(f"{row['dataset']:<9} {row['batch']:>2} {row['temperature']:>3g} {row['method']:<11} {row['nodes']:>5} "
              f"{row['tokens_per_second']:>7.1f} {row['speedup']:>7.2f}x {row['tau']:>5.2f} {row['target_calls']:>6} "
              f"{row['verified_tokens']:>9} {str(row.get('equal_to_plain', '')):>6}", flush=True)

    for dataset in ([] if args.no_grid else args.datasets.split(",")):
        held_out = held_out_prompts(dataset, args.num_prompts)
        meta["prompts"][dataset] = held_out.source
        prompts = [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in held_out.prompts]
        for batch in (int(b) for b in args.batches.split(",")):
            for temperature in (float(t) for t in args.temperatures.split(",")):
                engine_for("plain", args.nodes).generate(prompts[:1], SamplingParams(max_tokens=8))  # compile
                for method in methods:  # compile outside the timing
                    engine_for(method, args.nodes).generate(prompts[:batch], SamplingParams(max_tokens=16))
                # the methods take turns, repeats times: each figure is the median of its runs
                runs = {m: [] for m in ["plain", *methods]}
                for _ in range(args.repeats):
                    for method, results in runs.items():
                        results.append(run(engine_for(method, args.nodes), prompts, batch, temperature,
                                           args.max_tokens))
                plain = median_run(runs.pop("plain"))
                base = dict(dataset=dataset, batch=batch, temperature=temperature)
                report({**base, "method": "plain", "nodes": 1, **plain, "speedup": 1.0})
                for method, results in runs.items():
                    engine, out = engine_for(method, args.nodes), median_run(results)
                    row = {**base, "method": method, "nodes": engine.spec.config.num_nodes,
                           "depth": engine.spec.config.depth, **out,
                           "speedup": out["tokens_per_second"] / plain["tokens_per_second"]}
                    row["equal_to_plain"] = all(r["outputs"] == plain["outputs"] for r in results)  # same seeds
                    report(row)
    if args.budgets:
        dataset = args.datasets.split(",")[0]
        prompts = [tokenizer.encode_chat([{"role": "user", "content": t}])
                   for t in held_out_prompts(dataset, args.num_prompts).prompts]
        plain = run(engine_for("plain", args.nodes), prompts, 1, 0.0, args.max_tokens)
        for nodes in (int(n) for n in args.budgets.split(",")):
            for method in methods:
                engine = engine_for(method, nodes)
                engine.generate(prompts[:1], SamplingParams(max_tokens=16))
                out = run(engine, prompts, 1, 0.0, args.max_tokens)
                report({"dataset": dataset, "batch": 1, "temperature": 0.0, "method": method, "nodes": nodes,
                        "sweep": True, **out, "speedup": out["tokens_per_second"] / plain["tokens_per_second"],
                        "equal_to_plain": out["outputs"] == plain["outputs"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
