"""What a verification step costs on this machine: time of one target step over B requests x N tree
nodes (N = 1 is a plain decode step's work plus the tree machinery), next to a plain decode step, at
a given context length. The ratio bounds what speculation can gain: a round pays when tau exceeds
verify time / decode time.

    PYTHONPATH=. python profiling/spec_step_costs.py --json profiling/results/spec_step_costs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import EngineConfig, SchedulerConfig, SpeculativeConfig
from jaxinfer.engine.batch import step_shape
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.scheduler import SchedulerOutput
from jaxinfer.loader import DEFAULT_MODEL, load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.batch import TreeShape, build_tree_input
from jaxinfer.spec.programs import VerifyProgram
from jaxinfer.spec.tree import DraftTree, pack


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto", help="weight format (jaxinfer.config.WEIGHT_DTYPES)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--nodes", default="2,4,8,16,32")
    parser.add_argument("--context", type=int, default=256, help="committed tokens per request")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    loaded = load_model(args.model, args.dtype)
    nodes_list = [int(n) for n in args.nodes.split(",")]
    scheduler = SchedulerConfig(max_num_seqs=4, max_model_len=2048, decode_buckets=(1, 4),
                                prefill_buckets=(64, 128, 256), kv_buckets=(512, 2048))
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        scheduler=scheduler, speculative=SpeculativeConfig(method="ngram", num_nodes=max(nodes_list), max_batch=4)))
    runner, blocks = engine.runner, engine.block_manager
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'B':>2} {'step':<8} {'nodes':>5} {'ms (median)':>12} {'x decode':>9}")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [rng.integers(100, 40000, args.context).tolist() for _ in range(batch)]
        for index, prompt in enumerate(prompts):  # prefill, then hold the requests at the decode point
            engine.add_request(prompt, SamplingParams(max_tokens=10_000, ignore_eos=True), f"r{batch}-{index}")
        while any(not s.is_decoding for s in engine.scheduler.running) or engine.scheduler.waiting:
            out = engine.scheduler.schedule()
            shape = step_shape(out, engine.scheduler_config)
            result = runner.execute(out, shape)
            engine._postprocess(out, result, shape.num_decode)
        seqs = list(engine.scheduler.running)
        for seq in seqs:  # pages for the decode token and the largest tree
            blocks.append(seq, max(nodes_list) + 1)

        def timed(run) -> float:
            run()  # compile / warm
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            return statistics.median(samples) * 1e3

        out = SchedulerOutput(list(seqs), [], [])
        shape = step_shape(out, engine.scheduler_config)
        decode_ms = timed(lambda o=out, s=shape: runner.execute(o, s))  # the same step again: KV rewritten in place
        rows.append(dict(batch=batch, step="decode", nodes=1, ms=decode_ms, ratio=1.0))
        print(f"{batch:>2} {'decode':<8} {1:>5} {decode_ms:>12.1f} {1.0:>8.2f}x", flush=True)
        for nodes in nodes_list:
            trees = [DraftTree(np.asarray([s.token(s.num_computed)] + [5] * (nodes - 1), np.int32),
                               np.asarray([-1] + [0] * (nodes - 1), np.int32)) for s in seqs]
            tree_shape = TreeShape(next(r for r in engine.spec.row_buckets if r >= batch), nodes,
                                   engine.spec.path_len, 512)
            tree_batch = build_tree_input(seqs, pack(trees, tree_shape.num_rows, nodes), tree_shape,
                                          blocks.page_size, runner.builder.max_pages_per_seq,
                                          scheduler.max_num_seqs, impl=runner.impl, interpret=runner.interpret)
            # nothing commits past the root's slot
            ms = timed(lambda b=tree_batch, s=tree_shape: runner.run(VerifyProgram(s), b))
            rows.append(dict(batch=batch, step="verify", nodes=nodes, ms=ms, ratio=ms / decode_ms))
            print(f"{batch:>2} {'verify':<8} {nodes:>5} {ms:>12.1f} {ms / decode_ms:>8.2f}x", flush=True)
        for seq in seqs:
            engine.abort(seq.request_id)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), context=args.context,
                                                   model=args.model, dtype=args.dtype, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
