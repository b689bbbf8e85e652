"""The CPU fast path beside its peers, in one sitting: prefill 128/512/2048 and batch-1 decode
(``jaxinfer.bench latency``), batch 8 and 32 aggregate decode (``jaxinfer.bench throughput``) for
each weight format, then llama.cpp and HF transformers (``../shared/peers/bench_peers.py --hf``,
when the peers were built with ``../shared/peers/setup.sh``); ratios against the best peer.

    python profiling/bench_cpu.py [--dtypes float32,q8_0,auto] [--skip-peers] [--json FILE]

Each measurement is its own process, run one after another (2 cores: run nothing else meanwhile).
Prints a table; writes JSON (default profiling/results/cpu_fast_path.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from jaxinfer.datasets import shared_root

ROOT = Path(__file__).resolve().parent.parent
PEERS = shared_root() / "peers" / "bench_peers.py"
ROWS = ("prefill 128", "prefill 512", "prefill 2048", "decode b1", "decode b8 aggregate", "decode b32 aggregate")


def jaxinfer_figures(dtype: str, repeats: int) -> dict:
    """ROWS -> tok/s of jaxinfer with ``dtype`` weights, plus weight bytes and warm-up seconds."""
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "latency.json"
        _bench(["latency", "--dtype", dtype, "--prompt-lens", "128,512,2048", "--output-len", "128",
                "--repeats", str(repeats), "--json", str(out)])
        latency = json.loads(out.read_text())
        for row in latency["rows"]:
            figures[f"prefill {row['prompt_tokens']}"] = row["prefill_tok_s"]
        figures["decode b1"] = next(r["decode_tok_s"] for r in latency["rows"] if r["prompt_tokens"] == 128)
        figures["warm_up_seconds"] = latency["warm_up_seconds"]
        for batch in (8, 32):
            out = Path(tmp) / f"b{batch}.json"
            _bench(["throughput", "--dtype", dtype, "--batch", str(batch), "--input-len", "54", "--output-len", "128",
                    "--repeats", str(repeats), "--json", str(out)])
            figures[f"decode b{batch} aggregate"] = json.loads(out.read_text())["decode_tok_s"]
    return figures


def _bench(args: list[str]) -> None:
    command = [sys.executable, "-m", "jaxinfer.bench", *args]
    print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def peer_figures() -> dict:
    """ROWS -> tok/s of llama.cpp and of HF transformers, keyed 'llama.cpp' / 'HF'."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        subprocess.run([sys.executable, str(PEERS), "--hf", "--json", str(out)], check=True)
        raw = json.loads(out.read_text())
    llama = {row: raw.get(f"llama.cpp {row}") for row in ROWS}  # bench_peers names its rows the same way
    return {"llama.cpp": llama, "HF": {"prefill 512": raw.get("HF f32 prefill 512")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,q8_0,auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "profiling" / "results" / "cpu_fast_path.json"))
    args = parser.parse_args()
    results = {f"jaxinfer {d}": jaxinfer_figures(d, args.repeats) for d in args.dtypes.split(",")}
    if not args.skip_peers:
        if not PEERS.is_file():
            raise SystemExit(f"peer benchmark not found at {PEERS}; pass --skip-peers")
        results.update(peer_figures())
    names = list(results)
    print(f"{'tok/s':24}" + "".join(f"{n:>18}" for n in names) + f"{'best jaxinfer / best peer':>28}")
    ratios = {}
    for row in ROWS:
        cells = [results[n].get(row) for n in names]
        ours = [v for n, v in zip(names, cells, strict=True) if n.startswith("jaxinfer") and v]
        peers = [v for n, v in zip(names, cells, strict=True) if not n.startswith("jaxinfer") and v]
        ratios[row] = max(ours) / max(peers) if ours and peers else None
        ratio = f"{ratios[row]:.2f}" if ratios[row] else "-"
        print(f"{row:24}" + "".join(f"{v:>18.1f}" if v else f"{'-':>18}" for v in cells) + f"{ratio:>28}")
    record = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), results=results,
                  best_jaxinfer_over_best_peer=ratios)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
