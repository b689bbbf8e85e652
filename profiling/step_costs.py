"""Time per step shape under a Poisson-like load, offline through Engine.step (no server in the way).

    python profiling/step_costs.py [--requests 48] [--rate 0.75] [--scheduler '{"max_num_seqs": 32}'] [--json FILE]

Requests arrive at ``--rate`` per second (seeded exponential gaps) with 40-140 random prompt tokens and
32-256 new tokens (EOS ignored); the engine compiles shapes on first use and a shape's first step is left
out of its timing. Prints each shape's step count, mean step time and total time, most expensive first:
where a workload's time goes, and what a bucket choice costs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import random
import time
from pathlib import Path

from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import EngineConfig, SchedulerConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.loader import DEFAULT_MODEL, load_model
from jaxinfer.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=0.75, help="arrivals per second")
    parser.add_argument("--scheduler", default="{}", help="SchedulerConfig fields as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(REPO / "profiling" / "results" / "step_costs.json"))
    args = parser.parse_args()
    enable_compilation_cache()
    loaded = load_model(args.model)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.scheduler).items()}
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(scheduler=SchedulerConfig(**overrides)))
    rng = random.Random(args.seed)
    arrivals, clock = [], 0.0
    for _ in range(args.requests):
        clock += rng.expovariate(args.rate)
        prompt = [rng.randrange(100, 10000) for _ in range(rng.randint(40, 140))]
        arrivals.append((clock, prompt, SamplingParams(max_tokens=rng.randint(32, 256), ignore_eos=True)))
    costs: dict = collections.defaultdict(list)
    start, finished, tokens = time.perf_counter(), 0, 0
    total = len(arrivals)
    while finished < total:
        now = time.perf_counter() - start
        while arrivals and arrivals[0][0] <= now:
            _, prompt, params = arrivals.pop(0)
            engine.add_request(prompt, params)
        if not engine.has_unfinished:
            time.sleep(max(0.0, min(0.05, arrivals[0][0] - now)) if arrivals else 0.0)
            continue
        step_start = time.perf_counter()
        outputs = engine.step()
        costs[engine.runner.last_shape].append(time.perf_counter() - step_start)
        tokens += sum(len(o.new_token_ids) for o in outputs)
        finished += sum(o.finished for o in outputs)
    wall = time.perf_counter() - start
    rows = []
    for shape, times in costs.items():
        warm = times[1:]  # the first step of a shape includes its compile
        if warm:
            rows.append({**dataclasses.asdict(shape), "steps": len(warm), "mean_ms": 1000 * sum(warm) / len(warm),
                         "total_s": sum(warm)})
    rows.sort(key=lambda r: -r["total_s"])
    print(f"{args.requests} requests, {tokens} tokens in {wall:.1f} s ({tokens / wall:.1f} tok/s, first-use "
          f"compiles included)")
    print(f"{'decode rows':>11}{'decode kv':>10}{'prompt tok':>11}{'prompt kv':>10}{'steps':>7}{'mean ms':>9}"
          f"{'total s':>9}")
    for r in rows:
        print(f"{r['num_decode']:>11}{r['decode_kv_tokens']:>10}{r['num_prefill_tokens']:>11}"
              f"{r['prefill_kv_tokens']:>10}{r['steps']:>7}{r['mean_ms']:>9.1f}{r['total_s']:>9.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "benchmark": "step_costs", "model": args.model, "date": datetime.date.today().isoformat(),
        "args": vars(args), "scheduler": dataclasses.asdict(engine.scheduler_config), "wall_s": wall,
        "tokens": tokens, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
