"""Where a decode step's time goes: attention vs MLP vs LM head vs sampling vs host, from a jax
profiler trace of steady-state decode steps on the embedded model.

Every XLA op event of the trace is attributed through its HLO op_name metadata (the model's
jax.named_scope names: attention, kv_write, mlp, lm_head, sample) in the compiled step that ran;
"host" is step wall time minus the time the device spent in XLA ops. With bursts (``--decode-steps``
above 1, the default) one device call runs several decode steps; times are per decode step.

    python profiling/step_breakdown.py [--batch 8] [--context 512] [--steps 16] [--decode-steps 4]
                                       [--dtype auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxinfer.config import WEIGHT_DTYPES, CacheConfig, EngineConfig, SchedulerConfig
from jaxinfer.engine.compile_plan import SamplerRows
from jaxinfer.engine.engine import Engine
from jaxinfer.loader import DEFAULT_MODEL, load_model
from jaxinfer.sampling_params import SamplingParams

CATEGORIES = [("kv write", "kv_write"), ("attention", "/attention/"), ("MLP", "/mlp/"), ("LM head", "lm_head"),
              ("sampling", "sample"), ("penalty state", "penalty_state"),
              ("q/k/v/o projections", "...i,io->...o"), ("q/k/v/o projections", "/qlinear/"),
              ("embedding", "/embed/"), ("norms/rope/other", "")]


def op_scopes(executable) -> dict[tuple[str, str], str]:
    """(HLO module, instruction name) -> op_name metadata, from a compiled executable's text."""
    text = executable.as_text()
    module = re.match(r"HloModule ([\w.\-]+)", text).group(1)
    scopes = {}
    for line in text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
        if match:
            scopes[module, match.group(1)] = match.group(2)
    return scopes


def category(scope: str) -> str:
    for name, key in CATEGORIES:
        if key in scope:
            return name
    return "norms/rope/other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=16, help="decode steps to trace (at least)")
    parser.add_argument("--decode-steps", type=int, default=SchedulerConfig().decode_steps,
                        help="decode steps per device call (1: one call per step)")
    parser.add_argument("--dtype", default="auto", choices=WEIGHT_DTYPES)
    parser.add_argument("--json")
    args = parser.parse_args()

    loaded = load_model(args.model, args.dtype)
    config = EngineConfig(cache=CacheConfig(kv_memory_gib=2.0),
                          scheduler=SchedulerConfig(max_num_seqs=args.batch, decode_steps=args.decode_steps))
    engine = Engine(loaded.model, loaded.tokenizer, config)
    rng = np.random.default_rng(0)
    for _ in range(args.batch):
        engine.add_request(rng.integers(3, loaded.config.vocab_size, args.context).tolist(),
                           SamplingParams(max_tokens=2 * args.steps + 4 * args.decode_steps + 8, ignore_eos=True))
    def decoding(metrics) -> bool:
        return metrics.num_running == args.batch and metrics.last_step_tokens == metrics.last_step_decode_tokens > 0
    while not decoding(engine.metrics()):
        engine.step()
    engine.step()
    shape = engine.runner.last_shape
    trace_dir = Path(tempfile.mkdtemp(prefix="jaxinfer-trace-"))
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    start, first = time.perf_counter(), engine.num_steps
    while engine.num_steps - first < args.steps:
        engine.step()
    steps = engine.num_steps - first
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()

    runner = engine.runner
    compiled = runner.executables()
    scopes = op_scopes(compiled[shape])
    if not runner.bursts(shape):
        scopes |= op_scopes(compiled[SamplerRows(runner.builder.num_rows(shape))])
    trace = sorted(glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True))[-1]
    events = [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]
    totals: collections.Counter = collections.Counter()
    for event in events:
        op, module = event.get("args", {}).get("hlo_op"), event.get("args", {}).get("hlo_module")
        if op is not None and event["name"] == op:
            totals[category(scopes.get((module, op), ""))] += event["dur"] / 1000 / steps
    shutil.rmtree(trace_dir, ignore_errors=True)
    device = sum(totals.values())
    rows = [(name, ms) for name, ms in totals.most_common()] + [("host (schedule, batch, dispatch, outputs)",
                                                                  max(0.0, wall * 1000 - device))]
    print(f"decode step, batch {args.batch}, context ~{args.context}, {args.decode_steps} per call: "
          f"{wall * 1000:.2f} ms/step ({args.batch / wall:.1f} tok/s); shape {shape}")
    for name, ms in rows:
        print(f"  {name:<44} {ms:8.2f} ms  {100 * ms / (wall * 1000):5.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            dtype=args.dtype, batch=args.batch, context=args.context, decode_steps=args.decode_steps,
            step_ms=wall * 1000, breakdown_ms=dict(rows),
            shape=str(shape), machine=platform.processor() or platform.machine(), jax=jax.__version__,
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")), indent=2) + "\n")


if __name__ == "__main__":
    main()
