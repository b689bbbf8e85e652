"""Routers compared in the cluster simulator (no jax): cascade, round-robin, least-loaded and
llumnix on the shared request traces (Azure conversation and code, Mooncake conversation and
synthetic) or a synthetic long-context mix, at several offered loads.

    PYTHONPATH=. python profiling/bench_router_sim.py [--cost-model profiling/results/cost_model.json]
        [--replicas 16] [--loads 0.2,0.3,0.4,0.5] [--requests 6000] [--trace azure_conv|...|long|all]

Loads are fractions of the cluster's estimated capacity: the replica-seconds of marginal work per
request under the cost model (decode rows at their context, prefill chunks) against the replicas'
seconds; a recorded trace is time-compressed (or stretched) to reach that rate, the long mix is
generated at it. Lengths past the profile's context (``--max-len``, at most one replica's KV pool)
are cut to it.
That capacity ignores the step overhead and the padding of decode rows to the batch's longest
context, so length-agnostic routers saturate well below load 1 (around 0.4 with the synthetic model).
The cascade is planned from a sample of requests that precede the simulated ones (the operator's
"first minutes of the trace"). SLO: a request meets it when its E2E latency is at most
``--slo-factor`` times its unloaded latency (its prompt prefilled alone, then decoding alone);
goodput = requests meeting it per second; throughput at SLO = the highest offered rate at which at
least 90% of the requests meet it. Also times the routers' decisions with 64 replicas.

Prints a table and writes JSON after every run (profiling/results/router_sim[_long].json), then
plots the E2E latency CDFs and the cascade's stage occupancy (profiling/results/router_*.png).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np

from jaxinfer.router.base import NewRequest, ReplicaLoad, RequestLoad
from jaxinfer.router.baselines import ROUTERS, make_router
from jaxinfer.router.cost_model import CostModel
from jaxinfer.router.partition import default_grid, demand_from_requests, partition
from jaxinfer.router.sim import Simulator
from jaxinfer.router.trace import TRACE_NAMES, cap_lengths, load_trace, long_context_mix, scale_rate, summarize, take

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("mean_e2e", "p50_e2e", "p99_e2e", "mean_ttft", "p99_ttft", "mean_tpot", "requests_per_second",
        "tokens_per_second", "migrations_per_request", "preemptions_per_request", "mean_paused",
        "router_ms_per_decision", "dispatch_us", "rebalance_us", "decode_padding_fraction", "busy_fraction")


def work_seconds(cm: CostModel, pairs) -> np.ndarray:
    """Replica-seconds of each (prompt, output) request: decode rows at their context without the
    per-step overhead, and its prefill chunks."""
    _, b, c = cm.decode_fit()
    pa, pb, pc = cm.prefill_fit()
    p, o = np.asarray(pairs, float).T
    return o * (b + c * (p + o / 2)) + np.ceil(p / cm.max_num_batched_tokens) * pa + pb * p + pc * p * p / 2


def throughput_at_slo(runs: list[dict], routers) -> dict[str, float]:
    """Per router, the highest offered rate at which at least 90% of its requests met the SLO."""
    return {name: max([r["rate_rps"] for r in runs if r["router"] == name and r["slo_attainment"] >= 0.9],
                      default=0.0) for name in routers}


def unloaded_e2e(cm: CostModel, prompt: int, output: int) -> float:
    return cm.recompute_seconds(prompt) + (output - 1) * cm.decode_seconds(1, prompt + output // 2)


def workload(args, cm: CostModel, load: float, capacity_rps: float, base: list):
    """(sample for the cascade's plan, simulated requests, offered rate) at ``load``."""
    rate = load * capacity_rps
    if base is not None:
        native = len(base) / max(base[-1].arrival - base[0].arrival, 1e-9)
        trace = scale_rate(base, rate / native)
    else:
        trace = long_context_mix(args.sample + args.requests, rate, seed=args.seed, max_len=args.max_len,
                                 min_len=min(1024, args.max_len // 32))
    return trace[:args.sample], take(trace[args.sample:], count=args.requests), rate


def snapshots(cm: CostModel, max_len: int, pairs, num_replicas: int, per_replica: int, router) -> list[ReplicaLoad]:
    """A loaded cluster as ``router`` keeps it: for the cascade every replica holds contexts of its
    stage (one in 32 just past its upper boundary, due for hand-off), for the others any context."""
    rng = np.random.default_rng(0)
    contexts = np.array([min(p + int(rng.integers(0, o + 1)), max_len - 1) for p, o in pairs])
    prompts = np.array([p for p, _ in pairs])
    pages, snaps = cm.kv_capacity_pages, []
    for i in range(num_replicas):
        pool = np.arange(len(pairs))
        if hasattr(router, "stage_of_replica"):
            s = router.stage_of_replica(i)
            lo, hi = router.boundaries[s], router.boundaries[s + 1]
            inside = pool[(contexts >= lo) & (contexts < hi)]
            pool = inside if len(inside) else pool
        picks = rng.choice(pool, per_replica)
        reqs = []
        for k, j in enumerate(picks):
            ctx = int(contexts[j])
            if hasattr(router, "stage_of_replica") and k % 32 == 0:
                ctx = min(int(router.boundaries[router.stage_of_replica(i) + 1] * 1.1), max_len - 1)
            reqs.append(RequestLoad(f"q{i}_{k}", min(int(prompts[j]), ctx), ctx, 100, k < per_replica - 4))
        used = min(sum(-(-r.context_len // cm.page_size) for r in reqs if r.running), pages)
        snaps.append(ReplicaLoad(i, tuple(reqs), used, pages, cm.page_size, 0, 0, True, 0.02))
    return snaps


def microbench(cm: CostModel, max_len: int, pairs, num_replicas: int = 64, per_replica: int = 64) -> dict:
    """Decision times with ``num_replicas`` replicas of ``per_replica`` requests each (a fixed
    snapshot; the cascade's refinement and re-plan checks, every 2 and 30 s, count at their rate)."""
    out = {"replicas": num_replicas, "requests_per_replica": per_replica}
    for name in ROUTERS:
        kw = {"sample": pairs[:1000]} if name == "cascade" else {}
        router = make_router(name, num_replicas, cm, max_len, **kw)
        snaps = snapshots(cm, max_len, pairs, num_replicas, per_replica, router)
        start = time.perf_counter()
        for k in range(500):
            router.dispatch(NewRequest(f"n{k}", pairs[k % len(pairs)][0], 100), snaps, 0.0)
        dispatch_ms = (time.perf_counter() - start) / 500 * 1e3
        start, orders = time.perf_counter(), 0
        for k in range(100):
            orders += len(router.rebalance(snaps, 0.1 * (k + 1)))
        out[name] = {"dispatch_ms": dispatch_ms, "rebalance_ms": (time.perf_counter() - start) / 100 * 1e3,
                     "orders_per_rebalance": orders / 100}
    sample = pairs[:1000]
    window = float(np.sum(work_seconds(cm, sample))) / (0.3 * num_replicas)  # the sample at 30% load
    checked = make_router("cascade", num_replicas, cm, max_len, sample=sample, sample_window_seconds=window)
    out["checked_replan_ms"] = 1e3 * checked.last_check["seconds"]
    out["checked_replan"] = {k: v for k, v in checked.last_check.items() if k != "seconds"}
    grid = default_grid(max_len, num_buckets=32, page_size=cm.page_size)
    demand = demand_from_requests(pairs, grid, 60.0)
    start = time.perf_counter()
    partition(demand, grid, num_replicas, cm)
    out["dp_ms_k32"] = (time.perf_counter() - start) * 1e3
    return out


def _save(plt, fig, name: str) -> str:
    path = RESULTS / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot(result: dict, cdfs: dict, occupancy: dict | None, suffix: str) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: they need matplotlib (pip install -e '.[train]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    loads = sorted(cdfs)
    fig, axes = plt.subplots(1, len(loads), figsize=(4.5 * len(loads), 3.8), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        for name, e2e in cdfs[load].items():
            ax.plot(np.sort(e2e), np.linspace(0, 1, len(e2e)), label=name)
        ax.set_xscale("log")
        ax.set_title(f"load {load:g}")
        ax.set_xlabel("E2E latency (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("CDF")
    axes[0][-1].legend()
    fig.suptitle(f"{result['trace']} trace, {result['replicas']} replicas ({result['cost_model']['model']})")
    fig.tight_layout()
    written.append(_save(plt, fig, f"router_latency_cdf{suffix}.png"))
    if occupancy and occupancy.get("stages"):
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        t = np.asarray(occupancy["times"])
        width = max(map(len, occupancy["stages"]))
        stages = np.asarray([row + [0] * (width - len(row)) for row in occupancy["stages"]])
        ax.stackplot(t, stages.T, labels=[f"stage {s}" for s in range(stages.shape[1])])
        ax.set_ylabel("requests")
        ax.legend(loc="upper left", fontsize=7)
        for s in range(1, max(map(len, occupancy["boundaries"])) - 1):
            bx.plot(t, [row[s] if s < len(row) - 1 else np.nan for row in occupancy["boundaries"]], label=f"b{s}")
        bx.set_yscale("log")
        bx.set_ylabel("boundary (tokens)")
        bx.set_xlabel("time (s)")
        fig.suptitle(f"cascade stage occupancy ({result['trace']}, load {occupancy['load']:g})")
        fig.tight_layout()
        written.append(_save(plt, fig, f"router_stage_occupancy{suffix}.png"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost-model", default=str(RESULTS / "cost_model.json"),
                        help="a profile from launch/profile_cost_model.py, or 'synthetic' (analytic 8B-on-H100-like)")
    parser.add_argument("--kv-capacity", type=int, default=0, help="override the KV pool (tokens per replica)")
    parser.add_argument("--mix-padding", type=float, default=None,
                        help="override the profile's decode_mix_padding (0: rows cost their own context, 1: "
                             "every row costs the batch's longest); a sensitivity study")
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--loads", default="0.1,0.2,0.3,0.4,0.5,0.6",
                        help="offered load, fractions of estimated capacity")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--sample", type=int, default=1000, help="requests before the simulated ones, for the plan")
    parser.add_argument("--trace", default="azure_conv",
                        help=f"comma list of {', '.join(TRACE_NAMES)}, long (synthetic long-context mix), or all")
    parser.add_argument("--max-len", type=int, default=0, help="default: 131072 (a synthetic profile) or the "
                        "profile's KV pool")
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--migration", choices=("live", "recompute", "auto"), default="live")
    parser.add_argument("--slo-factor", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="one trace only: where to write its JSON")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-microbench", action="store_true")
    args = parser.parse_args()
    traces = [*TRACE_NAMES, "long"] if args.trace == "all" else args.trace.split(",")
    for name in traces:
        if name not in (*TRACE_NAMES, "long"):
            parser.error(f"unknown trace {name!r}")
    synthetic = args.cost_model == "synthetic"
    if synthetic:
        cm = CostModel.synthetic(max_len=max(args.max_len, 131072))
        note = "SYNTHETIC: analytic 8B-on-H100-like model (not measured)"
    else:
        cm, note = CostModel.load(args.cost_model), f"profiled: {args.cost_model}"
        if "host" in cm.extra:  # a profile of replicas sharing this host's cores: here each has its own host
            cm = CostModel.from_dict({k: v for k, v in cm.to_dict().items() if k != "host"})
            note += " (host sharing dropped: one host per replica)"
    if args.kv_capacity:
        cm = cm.with_capacity(args.kv_capacity)
    if args.mix_padding is not None:
        cm = CostModel.from_dict({**cm.to_dict(), "decode_mix_padding": args.mix_padding})
        note += f" (decode_mix_padding set to {args.mix_padding})"
    max_len = min(args.max_len or 131072, cm.kv_capacity_tokens)  # a request must fit one replica's pool
    for name in traces:
        run_trace(args, name, cm, note, max_len, synthetic)


def run_trace(args, trace_name: str, cm: CostModel, note: str, max_len: int, synthetic: bool) -> None:
    args.trace, args.max_len = trace_name, max_len
    suffix = f"_{trace_name}_{'synthetic' if synthetic else 'cpu'}_{args.replicas}"
    if args.mix_padding is not None:
        suffix += f"_mix{args.mix_padding:g}"
    out_path = args.json or RESULTS / f"router_sim{suffix}.json"
    if trace_name != "long":
        base = cap_lengths(load_trace(trace_name), max_len)
        pairs = [(r.prompt_len, r.output_len) for r in base]
    else:
        base = None
        pairs = [(r.prompt_len, r.output_len) for r in long_context_mix(4000, 1.0, seed=args.seed, max_len=max_len,
                                                                   min_len=min(1024, max_len // 32))]
    capacity_rps = args.replicas / float(np.mean(work_seconds(cm, pairs)))
    result = {"benchmark": "router_sim", "date": datetime.date.today().isoformat(), "trace": args.trace,
              "replicas": args.replicas, "requests": args.requests, "plan_sample": args.sample, "max_len": max_len,
              "migration": args.migration, "cost_model": {"source": note, "synthetic": bool(cm.extra.get("synthetic")),
                                                          "hardware": cm.hardware, "model": cm.model,
                                                          "kv_capacity_tokens": cm.kv_capacity_tokens},
              "capacity_rps_estimate": capacity_rps,
              "slo": {"factor": args.slo_factor, "definition": "E2E <= factor x unloaded E2E (prompt prefilled "
                      "alone + decoding alone); goodput = requests/s meeting it; throughput_at_slo = highest offered "
                      "rate with >= 90% meeting it"}, "runs": []}
    print(f"cost model: {note}; estimated capacity {capacity_rps:.1f} req/s on {args.replicas} replicas")
    header = (f"{'load':>5} {'rate':>7} {'router':<13} {'E2E':>8} {'P99 E2E':>8} {'TTFT':>7} {'P99 TTFT':>8} "
              f"{'TPOT ms':>8} {'tok/s':>8} {'goodput':>8} {'SLO %':>6} {'mig/req':>7} {'router ms':>9} {'sim s':>6}")
    print(header)
    cdfs, occupancy = {}, None
    loads = [float(x) for x in args.loads.split(",")]
    for load in loads:
        sample, requests, rate = workload(args, cm, load, capacity_rps, base)
        result.setdefault("traces", {})[str(load)] = summarize(requests)
        window = max(sample[-1].arrival - sample[0].arrival, 1e-3)
        slo = np.array([args.slo_factor * unloaded_e2e(cm, r.prompt_len, r.output_len) for r in requests])
        for name in args.routers.split(","):
            kw = {"sample": [(r.arrival, r.prompt_len, r.output_len) for r in sample],
                  "sample_window_seconds": window} if name == "cascade" else {}
            router = make_router(name, args.replicas, cm, max_len, **kw)
            start = time.perf_counter()
            sim = Simulator(router, cm, args.replicas, [tuple(r) for r in requests], migration=args.migration).run()
            wall = time.perf_counter() - start
            s = sim.summary
            e2e = np.array([r.finish - r.arrival for r in sim.records])
            met = e2e <= slo
            run = {"load": load, "rate_rps": rate, "router": name, **{k: s[k] for k in KEYS if k in s},
                   "goodput_rps": float(met.sum()) / s["makespan"], "slo_attainment": float(met.mean()),
                   "migrations": s.get("migrations"), "router_state": router.describe(), "sim_wall_seconds": wall}
            result["runs"].append(run)
            cdfs.setdefault(load, {})[name] = e2e
            if name == "cascade" and (occupancy is None or load <= loads[len(loads) // 2]):
                occupancy = dict(sim.occupancy, load=load)
            print(f"{load:5.2f} {rate:7.2f} {name:<13} {s['mean_e2e']:8.2f} {s['p99_e2e']:8.2f} {s['mean_ttft']:7.2f} "
                  f"{s['p99_ttft']:8.2f} {s['mean_tpot'] * 1e3:8.1f} {s['tokens_per_second']:8.0f} "
                  f"{run['goodput_rps']:8.2f} {100 * run['slo_attainment']:6.1f} {s['migrations_per_request']:7.2f} "
                  f"{s['router_ms_per_decision']:9.3f} {wall:6.1f}", flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1) + "\n")
    result["throughput_at_slo_rps"] = throughput_at_slo(result["runs"], args.routers.split(","))
    print("throughput at SLO (req/s):", {k: round(v, 2) for k, v in result["throughput_at_slo_rps"].items()})
    if not args.no_microbench:
        result["microbench"] = microbench(cm, max_len, pairs)
        print("decision time at 64 replicas (ms):",
              {k: v for k, v in result["microbench"].items() if isinstance(v, dict)},
              f"DP K=32 N=64: {result['microbench']['dp_ms_k32']:.1f} ms, checked re-plan: "
              f"{result['microbench']['checked_replan_ms']:.0f} ms")
    if not args.no_plots:
        result["plots"] = plot(result, cdfs, occupancy, suffix)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
