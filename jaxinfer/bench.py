"""``python -m jaxinfer.bench latency|throughput``: measured speed of the engine on a model.

- ``latency``: one request at a time. For each prompt length: prefill tokens/s (prompt tokens over
  time to first token) and batch-1 decode tokens/s over ``--output-len`` greedy tokens, TTFT and time
  per output token; median of ``--repeats`` runs.
- ``throughput --batch B``: B identical-length requests at once; aggregate decode tokens/s over the
  steps that only decode, and end-to-end output tokens/s.
- ``throughput --dataset azure``: an offline run of ``--num-prompts`` requests whose prompt and output
  lengths are drawn from the Azure LLM inference trace (conversation), scaled down so the longest
  fits the context; total and output tokens/s.
Every step shape is compiled before timing (warm-up time is reported apart). Prompts are slices of
real text. Prints a table; ``--json FILE`` writes the numbers with the machine and date.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jaxinfer.cli import add_model_arguments, run_main
from jaxinfer.config import SchedulerConfig
from jaxinfer.datasets import ESSAYS, shared_file, shared_root, trace_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxinfer.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["latency", "throughput"])
    add_model_arguments(parser)
    parser.add_argument("--prompt-lens", default="128,512,2048", help="latency: comma-separated prompt lengths")
    parser.add_argument("--output-len", type=int, default=128, help="new tokens per request (fixed-size runs)")
    parser.add_argument("--input-len", type=int, default=54, help="throughput --batch: prompt tokens per request")
    parser.add_argument("--batch", type=int, default=8, help="throughput: concurrent requests")
    parser.add_argument("--dataset", choices=["azure"], help="throughput: draw request lengths from a trace")
    parser.add_argument("--num-prompts", type=int, default=256, help="throughput --dataset: requests")
    parser.add_argument("--max-model-len", type=int, default=0, help="context limit (0 = the model's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256, help="token budget per step")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=SchedulerConfig().decode_steps,
                        help="decode steps per device call while only decodes run")
    parser.add_argument("--kv-memory-gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write results here")
    return parser


SYNTHETIC_TOKENS = 1 << 16


def text_tokens(tokenizer) -> list[int]:
    """The benchmark prompts' source: the essays of the shared data folder when present, else (a pip
    install) a fixed pseudo-random stream of ordinary vocabulary ids. Speed does not depend on which
    tokens a prompt holds; only the prefix cache would, and slices of either never repeat."""
    essays = shared_file(*ESSAYS)
    files = sorted(essays.glob("*.txt")) if essays is not None else []
    if files:
        return tokenizer.encode("\n\n".join(f.read_text() for f in files))
    print(f"note: no benchmark text under {shared_root().joinpath('data', *ESSAYS)} (set JAXINFER_SHARED); "
          "using synthetic prompts", file=sys.stderr)
    vocab = tokenizer.vocab_size
    rng = random.Random(0)
    return [rng.randrange(min(256, vocab // 2), vocab) for _ in range(SYNTHETIC_TOKENS)]


def slices(tokens: list[int], lengths: Sequence[int], rng: random.Random) -> list[list[int]]:
    out = []
    for length in lengths:
        if length > len(tokens):
            raise ValueError(f"benchmark text has {len(tokens)} tokens, a prompt needs {length}")
        start = rng.randrange(0, len(tokens) - length + 1)
        out.append(tokens[start:start + length])
    return out


def azure_lengths(num: int, max_len: int, rng: random.Random) -> tuple[list[int], list[int], float]:
    """(prompt lengths, output lengths, scale) of num trace rows, scaled so every request fits."""
    with open(trace_file("azure_conv"), newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    picked = rng.sample(rows, num)
    scale = min(1.0, (max_len - 1) / max(c + g for c, g in picked))
    prompts = [max(1, int(c * scale)) for c, _ in picked]
    outputs = [max(1, int(g * scale)) for _, g in picked]
    return prompts, outputs, scale


@dataclasses.dataclass
class RunStats:
    seconds: float
    prompt_tokens: int
    output_tokens: int
    decode_seconds: float  # steps that only decoded
    decode_tokens: int
    num_steps: int
    num_preemptions: int
    outputs: list


def run(engine, prompts: list[list[int]], params: list) -> RunStats:
    """All requests at once, stepping until done; step times split into decode-only and mixed."""
    from jaxinfer.engine.scheduler import QueueFullError

    pending = list(zip(prompts, params, strict=False))[::-1]
    preempt0 = engine.scheduler.num_preemptions
    finished, decode_seconds, decode_tokens, steps = [], 0.0, 0, 0
    start = time.perf_counter()
    while pending or engine.has_unfinished:
        while pending:
            try:
                engine.add_request(*pending[-1])
            except QueueFullError:
                break
            pending.pop()
        t = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t
        steps += 1
        metrics = engine.metrics()
        if metrics.last_step_tokens == metrics.last_step_decode_tokens:
            decode_seconds += dt
            decode_tokens += metrics.last_step_decode_tokens
        finished += [o for o in outputs if o.finished]
    seconds = time.perf_counter() - start
    return RunStats(seconds, sum(map(len, prompts)), sum(len(o.output_ids) for o in finished), decode_seconds,
                    decode_tokens, steps, engine.scheduler.num_preemptions - preempt0, finished)


def make_engine(args, loaded, max_num_seqs: int):
    from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig
    from jaxinfer.engine.engine import Engine

    config = EngineConfig(cache=CacheConfig(page_size=args.page_size, kv_memory_gib=args.kv_memory_gib),
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=args.max_model_len,
                                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                                    max_waiting=4096, decode_steps=args.decode_steps))
    engine = Engine(loaded.model, loaded.tokenizer, config)
    start = time.perf_counter()
    engine.warm_up()
    return engine, time.perf_counter() - start


def latency(args, loaded, rng) -> dict:
    from jaxinfer.sampling_params import SamplingParams

    engine, warm = make_engine(args, loaded, 1)
    tokens = text_tokens(loaded.tokenizer)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    rows = []
    for length in (int(x) for x in args.prompt_lens.split(",")):
        ttft, decode, tpot = [], [], []
        for _ in range(args.repeats + 1):
            prompt = slices(tokens, [length], rng)[0]
            output = engine.generate([prompt], params)[0]
            m = output.metrics
            ttft.append(m.ttft_seconds)
            decode.append((len(output.output_ids) - 1) / m.decode_seconds)
            tpot.append(m.decode_seconds / (len(output.output_ids) - 1))
        ttft, decode, tpot = ttft[1:], decode[1:], tpot[1:]  # the first run warms caches
        rows.append(dict(prompt_tokens=length, output_tokens=args.output_len,
                         prefill_tok_s=length / statistics.median(ttft), ttft_ms=1000 * statistics.median(ttft),
                         decode_tok_s=statistics.median(decode), tpot_ms=1000 * statistics.median(tpot),
                         decode_tok_s_range=[min(decode), max(decode)]))
    print(f"{'prompt':>7} {'prefill tok/s':>14} {'TTFT ms':>9} {'decode b1 tok/s':>16} {'TPOT ms':>8}")
    for r in rows:
        print(f"{r['prompt_tokens']:>7} {r['prefill_tok_s']:>14.1f} {r['ttft_ms']:>9.1f} {r['decode_tok_s']:>16.1f} "
              f"{r['tpot_ms']:>8.2f}")
    return dict(rows=rows, warm_up_seconds=warm, compiles=engine.runner.num_compiles,
                kv_bytes_per_page=engine.bytes_per_page, page_size=args.page_size)


def throughput(args, loaded, rng) -> dict:
    from jaxinfer.sampling_params import SamplingParams

    tokens = text_tokens(loaded.tokenizer)
    max_len = min(args.max_model_len or loaded.config.max_position, loaded.config.max_position)
    if args.dataset == "azure":
        prompt_lens, output_lens, scale = azure_lengths(args.num_prompts, max_len, rng)
        max_num_seqs = args.batch
    else:
        prompt_lens, output_lens, scale = [args.input_len] * args.batch, [args.output_len] * args.batch, 1.0
        max_num_seqs = args.batch
    engine, warm = make_engine(args, loaded, max_num_seqs)
    prompts = slices(tokens, prompt_lens, rng)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in output_lens]
    runs = [run(engine, prompts, params) for _ in range(args.repeats if args.dataset is None else 1)]
    best = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    result = dict(
        requests=len(prompts), max_num_seqs=max_num_seqs, prompt_tokens=best.prompt_tokens,
        output_tokens=best.output_tokens, seconds=best.seconds,
        total_tok_s=(best.prompt_tokens + best.output_tokens) / best.seconds,
        output_tok_s=best.output_tokens / best.seconds,
        decode_tok_s=best.decode_tokens / best.decode_seconds if best.decode_seconds else None,
        decode_tok_s_runs=[r.decode_tokens / r.decode_seconds for r in runs if r.decode_seconds],
        steps=best.num_steps, preemptions=best.num_preemptions, length_scale=scale, warm_up_seconds=warm,
        compiles=engine.runner.num_compiles, kv_bytes_per_page=engine.bytes_per_page, page_size=args.page_size,
        kv_pages=engine.block_manager.num_pages)
    print(f"{'requests':>8} {'batch':>6} {'prompt tok':>10} {'output tok':>10} {'seconds':>8} {'total tok/s':>12} "
          f"{'output tok/s':>12} {'decode tok/s':>12}")
    decode = f"{result['decode_tok_s']:.1f}" if result["decode_tok_s"] else "-"
    print(f"{result['requests']:>8} {max_num_seqs:>6} {best.prompt_tokens:>10} {best.output_tokens:>10} "
          f"{best.seconds:>8.1f} {result['total_tok_s']:>12.1f} {result['output_tok_s']:>12.1f} {decode:>12}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("output_len", "input_len", "batch", "num_prompts", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.dataset == "azure":
        trace_file("azure_conv")  # FileNotFoundError naming the missing trace, before the model loads
    import jax

    from jaxinfer.compile_cache import enable_compilation_cache
    from jaxinfer.loader import load_model

    enable_compilation_cache()
    loaded = load_model(args.model, args.dtype)
    rng = random.Random(args.seed)
    result = latency(args, loaded, rng) if args.mode == "latency" else throughput(args, loaded, rng)
    print(f"KV memory per page: {result['kv_bytes_per_page'] / 1024:.0f} KiB ({args.page_size} tokens); "
          f"warm-up {result['warm_up_seconds']:.1f} s for {result['compiles']} compiled steps", file=sys.stderr)
    if args.json:
        record = dict(mode=args.mode, model=loaded.source, dtype=args.dtype, argv=sys.argv[1:] if argv is None
                      else list(argv), machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                      backend=jax.default_backend(), jax=jax.__version__,
                      date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **result)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
