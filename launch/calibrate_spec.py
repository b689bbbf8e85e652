"""Tune a draft head's round policy for this machine and fit HeteroSpec's entropy bins for it.

1. Tuning (--tune): EAGLE rounds of every (depth, verify budget) of the grid, timed end to end on
   tuning prompts at batch 1 (each grid point one engine, warmed up first), beside plain decoding in
   the same sitting; the fastest point becomes the head's policy. The verify cost grows with the
   budget at a rate set by the machine (a step's matmuls turn compute-bound past a few rows on a CPU,
   much later on a GPU) and the drafting cost with the depth, so the best point is the machine's.
2. Bins: EAGLE rounds at that policy on calibration prompts, recording per round the path entropy
   H* and the terminal confidence rank (TCR); a depth-3 regression tree of TCR on H* (HeteroSpec
   Eq. 2) gives the three lowest bin edges.
Both go into calibration.json next to the head; engines whose depth and budget are left unset (0)
take the policy from there.

    JAXINFER_CACHE=/tmp/jicache PYTHONPATH=. python launch/calibrate_spec.py --tune   # the shipped head

Calibration prompts come from the draft head's training split (GSM8K test lines [0, 660) and the
instruction templates of launch/train_draft.py), never from the benchmark sets (MT-Bench, GSM8K
lines [660, 1319)). The tree is fitted for the base policy it was recorded with (depth, top-k,
nodes): H* sums depth entropies of top-k distributions, so its scale depends on both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import DEFAULT_SPEC_DEPTH, DEFAULT_SPEC_NODES, EngineConfig, SchedulerConfig, SpeculativeConfig
from jaxinfer.datasets import shared_root
from jaxinfer.engine.engine import Engine
from jaxinfer.loader import DEFAULT_MODEL, load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.draft_head import CALIBRATION, default_draft_head_path, load_draft_head
from jaxinfer.spec.policy import fit_bins

REPO = Path(__file__).resolve().parent.parent
DATA = shared_root() / "data" / "prompts"  # training and calibration need the real prompt sets


def calibration_prompts(count: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("train_draft", REPO / "launch" / "train_draft.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    gsm = [json.loads(line)["question"] for line in open(DATA / "gsm8k_test.jsonl")][slice(*train.GSM8K_TRAIN)]
    instructions = [t.format(topic) for topic in train.TOPICS for t in train.TEMPLATES]
    rng = np.random.default_rng(0)
    picked_gsm = rng.choice(len(gsm), count // 2, replace=False)
    picked_ins = rng.choice(len(instructions), count - count // 2, replace=False)
    return [gsm[i] for i in picked_gsm] + [instructions[i] for i in picked_ins]


def _engine_config(spec: SpeculativeConfig) -> EngineConfig:
    return EngineConfig(scheduler=SchedulerConfig(max_num_seqs=1, max_model_len=2048, kv_buckets=(512, 2048),
                                                  prefill_buckets=(64, 128, 256)), speculative=spec)


def _tokens_per_second(engine: Engine, prompts: list[list[int]], max_tokens: int) -> float:
    """Decode tokens/s over the prompts one at a time (batch 1), after one warm-up request."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True))
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        start = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        seconds += time.perf_counter() - start
        tokens += len(out.output_ids)
    return tokens / seconds


def tune(loaded, head, prompts: list[list[int]], grid: list[tuple[int, int]], top_k: int, max_tokens: int) -> dict:
    """Tokens/s of EAGLE rounds at every (depth, nodes) of the grid and of plain decoding, same prompts."""
    plain = Engine(loaded.model, loaded.tokenizer, _engine_config(SpeculativeConfig()))
    rows = [dict(depth=0, nodes=0, tokens_per_second=_tokens_per_second(plain, prompts, max_tokens))]
    print(f"{'depth':>5} {'nodes':>5} {'tok/s':>7} {'x plain':>7}")
    print(f"{'plain':>11} {rows[0]['tokens_per_second']:>7.1f} {1:>7.2f}")
    del plain
    for depth, nodes in grid:
        spec = SpeculativeConfig(method="eagle", depth=depth, top_k=top_k, num_nodes=nodes, max_batch=1,
                                 adaptive=False)
        engine = Engine(loaded.model, loaded.tokenizer, _engine_config(spec), draft_head=head)
        rate = _tokens_per_second(engine, prompts, max_tokens)
        rows.append(dict(depth=depth, nodes=nodes, tokens_per_second=rate,
                         tau=engine.spec.stats.mean_accepted_length))
        print(f"{depth:>5} {nodes:>5} {rate:>7.1f} {rate / rows[0]['tokens_per_second']:>7.2f}", flush=True)
        del engine
    return dict(plain_tokens_per_second=rows[0]["tokens_per_second"], grid=rows[1:], prompts=len(prompts),
                max_tokens=max_tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--draft", default="", help="draft head directory (default: the shipped head)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--depth", type=int, default=DEFAULT_SPEC_DEPTH, help="policy without --tune")
    parser.add_argument("--top-k", type=int, default=SpeculativeConfig().top_k)
    parser.add_argument("--nodes", type=int, default=DEFAULT_SPEC_NODES, help="policy without --tune")
    parser.add_argument("--tune", action="store_true", help="time the grid below and take its fastest point")
    parser.add_argument("--tune-depths", default="3,4,5")
    parser.add_argument("--tune-nodes", default="3,4,6,8")
    parser.add_argument("--tune-prompts", type=int, default=6)
    parser.add_argument("--tune-tokens", type=int, default=96)
    parser.add_argument("--weighted", action="store_true", help="size-weighted split cost (CART) instead of Eq. 2")
    parser.add_argument("--out", default="", help="output JSON (default: DRAFT/calibration.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    draft = Path(args.draft) if args.draft else default_draft_head_path(args.model)
    if draft is None:
        raise SystemExit(f"error: no draft head shipped for {args.model}; pass --draft")
    enable_compilation_cache()
    loaded = load_model(args.model)  # the weight format the engine serves
    head = load_draft_head(draft)
    encode = loaded.tokenizer.encode_chat
    prompts = [encode([{"role": "user", "content": p}]) for p in calibration_prompts(args.num_prompts
                                                                                     + args.tune_prompts)]
    prompts, tune_prompts = prompts[:args.num_prompts], prompts[args.num_prompts:]
    tuning = None
    if args.tune:
        grid = [(d, n) for d in map(int, args.tune_depths.split(",")) for n in map(int, args.tune_nodes.split(","))]
        tuning = tune(loaded, head, tune_prompts, grid, args.top_k, args.tune_tokens)
        best = max(tuning["grid"], key=lambda row: row["tokens_per_second"])
        args.depth, args.nodes = best["depth"], best["nodes"]
        print(f"tuned policy: depth {args.depth}, {args.nodes} nodes ({best['tokens_per_second']:.1f} tok/s, "
              f"plain {tuning['plain_tokens_per_second']:.1f})")
    spec = SpeculativeConfig(method="eagle", depth=args.depth, top_k=args.top_k, num_nodes=args.nodes, max_batch=1,
                             adaptive=False)
    engine = Engine(loaded.model, loaded.tokenizer, _engine_config(spec), draft_head=head)
    engine.spec.drafter.record = True
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.generate([prompt], SamplingParams(max_tokens=args.max_tokens))
        print(f"\rcalibration prompts: {index + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    records = np.asarray(engine.spec.drafter.records, np.float64)
    entropy, rank, accepted = records[:, 0], records[:, 1], records[:, 2]
    splits = fit_bins(entropy, rank, weighted=args.weighted)
    if len(splits) < 3:
        raise SystemExit(f"error: only {len(splits)} bin edges from {len(records)} rounds; use more prompts")
    thresholds = splits[:3]
    edges = (-np.inf, *splits, np.inf)
    bins = []
    print(f"{'bin':>3} {'H* from':>8} {'H* to':>8} {'rounds':>7} {'mean TCR':>9} {'mean accepted':>14}")
    for i in range(len(edges) - 1):
        inside = (entropy > edges[i]) & (entropy <= edges[i + 1])
        row = dict(low=edges[i], high=edges[i + 1], rounds=int(inside.sum()),
                   mean_rank=float(rank[inside].mean()) if inside.any() else None,
                   mean_accepted=float(accepted[inside].mean()) if inside.any() else None)
        bins.append(row)
        print(f"{i:>3} {row['low']:>8.3f} {row['high']:>8.3f} {row['rounds']:>7} "
              f"{row['mean_rank'] or 0:>9.2f} {row['mean_accepted'] or 0:>14.2f}")
    info = dict(thresholds=list(thresholds), splits=list(splits), weighted=args.weighted,
                policy=dict(depth=args.depth, top_k=args.top_k, nodes=args.nodes), rounds=len(records),
                prompts=len(prompts), max_tokens=args.max_tokens, seconds=round(time.perf_counter() - start, 1),
                bins=[{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in b.items()}
                      for b in bins],
                date=time.strftime("%Y-%m-%d"), tuning=tuning)
    out = Path(args.out) if args.out else draft / CALIBRATION
    out.write_text(json.dumps(info, indent=1))
    print(f"thresholds {', '.join(f'{t:.4f}' for t in thresholds)} from {len(records)} rounds -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
