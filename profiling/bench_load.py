"""Load time: dequantizing the GGUF vs reloading a jaxinfer (orbax) checkpoint written by convert.

    python profiling/bench_load.py [--model smollm2-135m] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

from jaxinfer.loader import DEFAULT_MODEL, load_model
from jaxinfer.loader.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent


def timed_load(spec: str, dtype: str) -> float:
    start = time.perf_counter()
    loaded = load_model(spec, dtype)
    loaded.model.embed_tokens[...].block_until_ready()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(REPO / "profiling" / "results" / "bench_load.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            loaded = load_model(args.model, dtype)
            ckpt = Path(tmp) / dtype
            save_checkpoint(ckpt, loaded.model, loaded.tokenizer, source=loaded.source)
            for label, spec in (("gguf (dequantize)", args.model), ("orbax checkpoint", str(ckpt))):
                times = [timed_load(spec, dtype) for _ in range(args.repeats)]
                rows.append({"source": label, "dtype": dtype, "median_s": statistics.median(times),
                             "min_s": min(times), "max_s": max(times)})
    print(f"{'source':<20}{'dtype':<10}{'median s':>10}{'min':>8}{'max':>8}")
    for row in rows:
        print(f"{row['source']:<20}{row['dtype']:<10}{row['median_s']:>10.2f}{row['min_s']:>8.2f}{row['max_s']:>8.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"benchmark": "load", "model": args.model,
                                           "date": datetime.date.today().isoformat(), "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
