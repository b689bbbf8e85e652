"""Fit HeteroSpec's entropy bins for a draft head: run EAGLE rounds on calibration prompts, record per
round the path entropy H* and the terminal confidence rank (TCR), fit a depth-3 regression tree of
TCR on H* (HeteroSpec Eq. 2) and store its three lowest bin edges next to the head.

    JAXINFER_CACHE=/tmp/jicache PYTHONPATH=. python launch/calibrate_spec.py   # the shipped head

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
from jaxinfer.config import EngineConfig, SchedulerConfig, SpeculativeConfig
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--draft", default="", help="draft head directory (default: the shipped head)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--depth", type=int, default=SpeculativeConfig().depth)
    parser.add_argument("--top-k", type=int, default=SpeculativeConfig().top_k)
    parser.add_argument("--nodes", type=int, default=SpeculativeConfig().num_nodes)
    parser.add_argument("--weighted", action="store_true", help="size-weighted split cost (CART) instead of Eq. 2")
    parser.add_argument("--out", default="", help="output JSON (default: DRAFT/calibration.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    draft = Path(args.draft) if args.draft else default_draft_head_path(args.model)
    if draft is None:
        raise SystemExit(f"error: no draft head shipped for {args.model}; pass --draft")
    enable_compilation_cache()
    loaded = load_model(args.model, "float32")
    spec = SpeculativeConfig(method="eagle", depth=args.depth, top_k=args.top_k, num_nodes=args.nodes, max_batch=1)
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=1, max_model_len=2048, kv_buckets=(512, 2048),
                                                    prefill_buckets=(64, 128, 256)), speculative=spec)
    engine = Engine(loaded.model, loaded.tokenizer, config, draft_head=load_draft_head(draft))
    engine.spec.drafter.record = True
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in
               calibration_prompts(args.num_prompts)]
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
                date=time.strftime("%Y-%m-%d"))
    out = Path(args.out) if args.out else draft / CALIBRATION
    out.write_text(json.dumps(info, indent=1))
    print(f"thresholds {', '.join(f'{t:.4f}' for t in thresholds)} from {len(records)} rounds -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
