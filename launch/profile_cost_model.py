"""Profile one replica's step time on this machine and save the cost model the CascadeInfer router
and the simulator use (jaxinfer.router.cost_model.CostModel): the time of a decode step by (rows,
KV length every row is padded to), of a prefill step by (prompt tokens, KV extent), the KV copy
bandwidth between two replica groups, how much of a length-mixed decode batch's spread a step pays
for and, for CPU replicas (virtual devices of one host), how much replicas stepping at once slow
each other down.

    JAXINFER_CACHE=/tmp/jicache PYTHONPATH=. python launch/profile_cost_model.py \
        --out $JAXINFER_CACHE/cost_model.json       # found there by python -m jaxinfer.serve

Each shape is compiled once and timed over --repeats runs (median). The step shapes are the
engine's own; decode steps run with every row at the KV bucket's length (the kernels read each row's
own pages, so a decode step's cost follows its rows' contexts, not the bucket).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402

from jaxinfer.compile_cache import enable_compilation_cache  # noqa: E402
from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from jaxinfer.engine.compile_plan import PageCopy  # noqa: E402
from jaxinfer.engine.engine import Engine  # noqa: E402
from jaxinfer.loader import DEFAULT_MODEL, load_model  # noqa: E402
from jaxinfer.replicas.placement import replica_meshes  # noqa: E402
from profiling.step_profile import profile  # noqa: E402


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=ints, default=(1, 4, 16, 32), help="decode rows (the engine's buckets)")
    parser.add_argument("--kv", type=ints, default=(128, 512, 1024, 2048, 4096, 8192), help="decode KV buckets")
    parser.add_argument("--prefill-tokens", type=ints, default=(64, 256))
    parser.add_argument("--prefill-kv", type=ints, default=(256, 1024, 4096, 8192))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=1024, help="KV pool of each profiled replica")
    parser.add_argument("--replicas", type=int, default=2, help="replicas stepping at once for the host model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("profiling/results/cost_model.json"))
    args = parser.parse_args(argv)

    enable_compilation_cache()
    loaded = load_model(args.model, args.dtype)
    max_len = max(args.kv[-1], args.prefill_kv[-1])
    scheduler = SchedulerConfig(max_num_seqs=args.batch[-1], max_num_batched_tokens=args.prefill_tokens[-1],
                                max_model_len=max_len, decode_buckets=args.batch, prefill_buckets=args.prefill_tokens,
                                kv_buckets=args.prefill_kv, decode_kv_buckets=args.kv)
    config = EngineConfig(cache=CacheConfig(page_size=args.page_size, num_pages=args.num_pages), scheduler=scheduler)
    devices = jax.local_devices()[:args.replicas]
    meshes = replica_meshes(len(devices), devices) if len(devices) > 1 else [None]
    engines = [Engine(loaded.model, loaded.tokenizer, config, mesh=mesh) for mesh in meshes]
    for engine in engines:  # the page transfers the copy bandwidth is timed on
        engine.runner.warm_up(e for e in engine.compile_plan(migration=True) if isinstance(e, PageCopy))
    result = profile(engines, decode_batch=args.batch, decode_kv=args.kv, prefill_tokens=args.prefill_tokens,
                     prefill_kv=args.prefill_kv, model=args.model, repeats=args.repeats,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: KV copy {result['copy_bytes_per_second'] / 1e9:.2f} GB/s, host {result.get('host')}")


if __name__ == "__main__":
    main()
