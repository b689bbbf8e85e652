"""Where a speculative round's time goes: drafting, verification and the host, from a jax profiler trace
of steady-state rounds on the embedded model (the round cost split of the speculation issue).

A round is the ``spec_round`` annotation of SpeculativeDecoder.step. Device time is attributed to the
compiled program that ran it (the draft head's tree expansion or the verification step; verification
further by the model's named scopes, as in step_breakdown.py); "host" is the round's wall time minus
that device time: the drafter's tree selection, the page bookkeeping, building and copying the
inputs, dispatch and reading the results back. Plain decode steps of the same requests are traced
too (one device call per step, and bursts as the engine runs them), for the comparison.

    python profiling/spec_round_split.py [--method heterospec] [--batch 1] [--rounds 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import platform
import shutil
import tempfile
from pathlib import Path

import jax
from step_breakdown import category, op_scopes

from jaxinfer.config import WEIGHT_DTYPES, CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from jaxinfer.datasets import prompt_set
from jaxinfer.engine.engine import Engine
from jaxinfer.loader import DEFAULT_MODEL, load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.batch import DraftShape, TreeShape
from jaxinfer.spec.draft_head import prepare_speculative
from jaxinfer.spec.round import RoundShape


def traced(engine: Engine, run, trace_dir: Path) -> list[dict]:
    """Complete events of ``run()`` under the profiler."""
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    run()
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True))[-1]
    return [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto", choices=WEIGHT_DTYPES)
    parser.add_argument("--method", default="heterospec", choices=("ngram", "eagle", "heterospec"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40, help="rounds to trace (at least)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    loaded = load_model(args.model, args.dtype)
    spec, head = prepare_speculative(SpeculativeConfig(method=args.method, num_nodes=args.nodes, adaptive=False),
                                     args.model)
    scheduler = SchedulerConfig(max_num_seqs=max(4, args.batch), max_model_len=1024, decode_buckets=(1, 2, 4),
                                prefill_buckets=(64, 128, 256), kv_buckets=(1024,))
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(cache=CacheConfig(kv_memory_gib=0.25),
                                                                 scheduler=scheduler, speculative=spec), head)
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": text}])
               for text in prompt_set("mt_bench", 0, args.batch).prompts]
    params = SamplingParams(max_tokens=4096, ignore_eos=True)
    engine.runner.warm_up(engine.spec.programs())  # every round shape compiled before the trace
    for index, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"r{index}")
    while engine.spec.stats.rounds < 3:  # prefill, compile, the first rounds
        engine.step()
    trace_dir = Path(tempfile.mkdtemp(prefix="jaxinfer-spec-trace-"))
    first_round, first_emitted = engine.spec.stats.rounds, engine.spec.stats.emitted_tokens

    def rounds():
        while engine.spec.stats.rounds - first_round < args.rounds:
            engine.step()

    events = traced(engine, rounds, trace_dir)
    num_rounds = engine.spec.stats.rounds - first_round
    emitted = engine.spec.stats.emitted_tokens - first_emitted

    runner = engine.runner
    scopes, kinds = {}, {}
    for key, executable in runner.executables().items():
        shape = key[0] if isinstance(key, tuple) else key
        if not isinstance(shape, (TreeShape, DraftShape, RoundShape)) or not hasattr(executable, "as_text"):
            continue
        found = op_scopes(executable)
        scopes |= found
        kind = "draft" if isinstance(shape, DraftShape) else "round" if isinstance(shape, RoundShape) else "verify"
        kinds |= {module: kind for module, _ in found}
    round_ms = [e["dur"] / 1000 for e in events if e["name"] == "spec_round"]
    totals: collections.Counter = collections.Counter()
    for event in events:
        op, module = event.get("args", {}).get("hlo_op"), event.get("args", {}).get("hlo_module")
        if op is None or event["name"] != op or module not in kinds:
            continue
        scope = scopes.get((module, op), "")
        if kinds[module] == "draft" or "/draft/" in scope or scope.endswith("/draft"):
            label = "draft head (tree expansion)"
        elif "/select/" in scope:
            label = "subtree selection (on device)"
        else:
            label = f"verify: {category(scope)}"
        totals[label] += event["dur"] / 1000 / max(1, len(round_ms))
    shutil.rmtree(trace_dir, ignore_errors=True)
    mean_round = sum(round_ms) / max(1, len(round_ms))
    device = sum(totals.values())
    rows = [(name, ms) for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    rows.append(("host (drafter, tree selection, pages, inputs, dispatch, readback)", max(0.0, mean_round - device)))
    stats = engine.spec.stats
    tau = emitted / max(1, num_rounds * args.batch)
    print(f"{args.method}, batch {args.batch}, {args.nodes} nodes: {mean_round:.2f} ms per round over "
          f"{len(round_ms)} rounds, tau {tau:.2f}: {args.batch * tau / mean_round * 1000:.1f} tok/s in rounds "
          f"(profiler on); fallback steps {stats.fallback_steps}")
    for name, ms in rows:
        print(f"  {name:<68} {ms:8.2f} ms  {100 * ms / mean_round:5.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            method=args.method, dtype=args.dtype, batch=args.batch, nodes=args.nodes, rounds=len(round_ms),
            round_ms=mean_round, tau=tau, tokens_per_second_in_rounds=args.batch * tau / mean_round * 1000,
            breakdown_ms=dict(rows), machine=platform.processor() or platform.machine(), jax=jax.__version__,
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
