"""Decode-step time of a length-mixed batch against homogeneous ones, on this machine's attention path
(CascadeInfer's premise: on GPUs a batch that mixes short and long contexts decodes 1.1-2.1x slower
than a homogeneous one). Every case runs the same compiled step (one padded shape: B rows, KV padded
to one bucket); only the rows' real context lengths differ, which is what the router's cost model
(step time by rows and the longest context) does not see.

    JAXINFER_CACHE=/tmp/jicache PYTHONPATH=. python profiling/bench_mixed_batch.py [--rows 8] [--long 2048]

Cases: all rows short, all long, one long row among short ones, half and half, and the homogeneous
batch at the mixed batch's mean length. Prints a table; writes JSON (default
profiling/results/mixed_batch.json). Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np

from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxinfer.engine.batch import StepShape
from jaxinfer.engine.engine import Engine
from jaxinfer.loader import DEFAULT_MODEL, load_model
from profiling.step_profile import step_seconds

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--short", type=int, default=128)
    parser.add_argument("--long", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=str(ROOT / "profiling" / "results" / "mixed_batch.json"))
    args = parser.parse_args(argv)
    enable_compilation_cache()
    loaded = load_model(args.model)
    rows, short, long = args.rows, args.short, args.long
    page = 16
    config = EngineConfig(cache=CacheConfig(page_size=page, num_pages=rows * (-(-long // page)) + 8),
                          scheduler=SchedulerConfig(max_num_seqs=rows, max_model_len=long, decode_steps=1,
                                                    decode_buckets=(rows,), decode_kv_buckets=(long,),
                                                    kv_buckets=(long,)))
    engine = Engine(loaded.model, loaded.tokenizer, config)
    shape = StepShape(rows, long, 0, 0)
    half = rows // 2
    mixed_one = [long] + [short] * (rows - 1)
    mixed_half = [long] * half + [short] * (rows - half)
    cases = {
        f"all {short}": [short] * rows,
        f"all {long}": [long] * rows,
        f"1 x {long} + {rows - 1} x {short}": mixed_one,
        f"homogeneous at that mean ({int(np.mean(mixed_one))})": [int(np.mean(mixed_one))] * rows,
        f"{half} x {long} + {rows - half} x {short}": mixed_half,
        f"homogeneous at that mean ({int(np.mean(mixed_half))})": [int(np.mean(mixed_half))] * rows,
    }
    results = {}
    for _ in range(2):  # two passes, cases interleaved: the VM drifts between runs
        for name, lengths in cases.items():
            results.setdefault(name, []).append(1e3 * step_seconds(engine, shape, args.repeats, lengths))
    table = {name: min(times) for name, times in results.items()}
    print(f"decode step, {rows} rows padded to KV {long}, {args.model} ({engine.runner.impl} attention)")
    print(f"{'batch':<44} {'ms/step':>8}")
    for name, ms in table.items():
        print(f"{name:<44} {ms:>8.2f}")
    names = list(table)
    slowdowns = {"one long row vs homogeneous at its mean": table[names[2]] / table[names[3]],
                 "half long vs homogeneous at its mean": table[names[4]] / table[names[5]],
                 "all long vs all short": table[names[1]] / table[names[0]]}
    for name, ratio in slowdowns.items():
        print(f"{name:<44} {ratio:>7.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": args.model, "rows": rows, "padded_kv": long, "impl": engine.runner.impl,
        "ms_per_step": table, "slowdowns": slowdowns}, indent=1))


if __name__ == "__main__":
    main()
