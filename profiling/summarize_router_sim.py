"""The cascade against the best baseline at every load, over the JSON files bench_router_sim.py wrote
(one per trace, cost model and cluster size), with the issue's goals checked: never more than 5%
worse on mean and P99 E2E at any load; at the highest load some baseline sustains (>= 90% within the
SLO), at least 50% lower mean and P99; at least 2x throughput at the SLO.

    PYTHONPATH=. python profiling/summarize_router_sim.py [profiling/results/router_sim_*_16.json ...]

Prints a table; writes profiling/results/router_sim_summary.json and router_sim_summary.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from profiling.bench_router_sim import throughput_at_slo

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("round-robin", "least-loaded", "llumnix")


def summarize(path: Path) -> dict:
    data = json.loads(path.read_text())
    runs = data["runs"]
    rows = []
    for load in sorted({r["load"] for r in runs}):
        at = {r["router"]: r for r in runs if r["load"] == load}
        if "cascade" not in at or not any(b in at for b in BASELINES):
            continue
        cascade = at["cascade"]
        best_mean = min(at[b]["mean_e2e"] for b in BASELINES if b in at)
        best_p99 = min(at[b]["p99_e2e"] for b in BASELINES if b in at)
        sustained = any(at[b]["slo_attainment"] >= 0.9 for b in BASELINES if b in at)
        rows.append({"load": load, "cascade_mean": cascade["mean_e2e"], "best_mean": best_mean,
                     "cascade_p99": cascade["p99_e2e"], "best_p99": best_p99,
                     "mean_ratio": cascade["mean_e2e"] / best_mean, "p99_ratio": cascade["p99_e2e"] / best_p99,
                     "baseline_sustains": sustained, "stages": len(cascade["router_state"].get("stages", []))})
    tput = throughput_at_slo(runs, sorted({r["router"] for r in runs}))
    best_tput = max((tput.get(b, 0.0) for b in BASELINES), default=0.0)
    top = max((r for r in rows if r["baseline_sustains"]), key=lambda r: r["load"], default=None)
    return {"file": path.name, "trace": data["trace"], "replicas": data["replicas"],
            "cost_model": "synthetic" if data["cost_model"]["synthetic"] else data["cost_model"]["hardware"],
            "rows": rows, "worst_mean_ratio": max(r["mean_ratio"] for r in rows),
            "worst_p99_ratio": max(r["p99_ratio"] for r in rows),
            "at_highest_sustained_load": top, "throughput_at_slo": tput,
            "throughput_ratio": tput.get("cascade", 0.0) / best_tput if best_tput else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS / "router_sim_summary.json")
    args = parser.parse_args()
    files = args.files or sorted(RESULTS.glob("router_sim_*_*_*.json"))
    summaries = [summarize(f) for f in files if "summary" not in f.name]
    print(f"{'trace':<22} {'model':<10} {'N':>3} {'load':>5} {'cascade E2E':>11} {'best':>7} {'ratio':>6} "
          f"{'cascade P99':>11} {'best':>7} {'ratio':>6} {'stages':>6}")
    for s in summaries:
        model = "synthetic" if s["cost_model"] == "synthetic" else "cpu"
        for r in s["rows"]:
            print(f"{s['trace']:<22} {model:<10} {s['replicas']:>3} {r['load']:5.2f} {r['cascade_mean']:11.2f} "
                  f"{r['best_mean']:7.2f} {r['mean_ratio']:6.2f} {r['cascade_p99']:11.2f} {r['best_p99']:7.2f} "
                  f"{r['p99_ratio']:6.2f} {r['stages']:>6}")
        ratio = s["throughput_ratio"]
        print(f"  worst ratio: mean {s['worst_mean_ratio']:.2f}, P99 {s['worst_p99_ratio']:.2f}; throughput at SLO "
              f"cascade/best baseline: {'n/a' if ratio is None else f'{ratio:.2f}x'}")
    args.out.write_text(json.dumps(summaries, indent=1) + "\n")
    plot(summaries, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(summaries: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: they need matplotlib (pip install -e '.[train]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for s in summaries:
        model = "synthetic" if s["cost_model"] == "synthetic" else "cpu"
        loads = [r["load"] for r in s["rows"]]
        label = f"{s['trace']} ({model}, {s['replicas']})"
        axes[0].plot(loads, [r["mean_ratio"] for r in s["rows"]], marker="o", label=label)
        axes[1].plot(loads, [r["p99_ratio"] for r in s["rows"]], marker="o", label=label)
    for ax, what in zip(axes, ("mean E2E", "P99 E2E"), strict=True):
        ax.axhline(1.05, color="k", ls="--", lw=0.8)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("offered load (fraction of estimated capacity)")
        ax.set_title(f"cascade / best baseline, {what}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ratio (< 1: cascade better)")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
