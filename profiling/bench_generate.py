"""Prefill and batch-1 greedy decode speed of the generator on the embedded default model.

Prefill: prompts of exactly N tokens cut from an essay text, tokens/s of the prompt pass (first
token included, compilation excluded). Decode: 256 new greedy tokens after a 128-token prompt
(EOS ignored), tokens/s of the decode phase. Median of --repeats runs after one warm-up run.

    python profiling/bench_generate.py [--model smollm2-135m] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
from pathlib import Path

import jax

from jaxinfer.generator import Generator
from jaxinfer.loader import DEFAULT_MODEL, load_model
from jaxinfer.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO.parent / "shared" / "data" / "longtext" / "PaulGrahamEssays"


def prompt_of(tokenizer, num_tokens: int) -> list[int]:
    files = sorted(TEXT.glob("*.txt")) if TEXT.is_dir() else []
    text = "\n\n".join(f.read_text() for f in files) or ("The quick brown fox jumps over the lazy dog. " * 2000)
    ids = tokenizer.encode(text)
    if len(ids) < num_tokens:
        raise ValueError(f"text has only {len(ids)} tokens, need {num_tokens}")
    return ids[:num_tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", default="128,512,2048")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--json", default=str(REPO / "profiling" / "results" / "bench_generate.json"))
    args = parser.parse_args()

    loaded = load_model(args.model, args.dtype)
    generator = Generator(loaded.model, loaded.tokenizer)
    rows = []
    for n in [int(x) for x in args.prefill.split(",")]:
        prompt = prompt_of(loaded.tokenizer, n)
        runs = []
        for i in range(args.repeats + 1):
            result = generator.generate([prompt], SamplingParams(max_tokens=1))[0]
            if i:
                runs.append(n / result.prefill_seconds)
        rows.append({"phase": "prefill", "tokens": n, "median_tok_s": statistics.median(runs),
                     "min_tok_s": min(runs), "max_tok_s": max(runs)})
    prompt = prompt_of(loaded.tokenizer, 128)
    runs = []
    for i in range(args.repeats + 1):
        params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
        result = generator.generate([prompt], params)[0]
        if i:
            runs.append((len(result.output_ids) - 1) / result.decode_seconds)
    rows.append({"phase": "decode b1", "tokens": args.decode_tokens, "median_tok_s": statistics.median(runs),
                 "min_tok_s": min(runs), "max_tok_s": max(runs)})

    print(f"{'phase':<12}{'tokens':>8}{'median tok/s':>15}{'min':>9}{'max':>9}")
    for row in rows:
        print(f"{row['phase']:<12}{row['tokens']:>8}{row['median_tok_s']:>15.1f}{row['min_tok_s']:>9.1f}"
              f"{row['max_tok_s']:>9.1f}")
    out = {"benchmark": "generate", "model": args.model, "dtype": args.dtype, "repeats": args.repeats,
           "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(),
           "jax": jax.__version__, "backend": jax.default_backend(), "load_seconds": loaded.load_seconds,
           "compile_seconds": generator.compile_seconds, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
