"""Hugging Face transformers' prefill speed on this machine (the peer for long prompts), in the
virtual environment that ``../shared/peers/setup.sh`` builds: float32, sdpa attention, 2 threads,
the embedded GGUF dequantized, one forward of a random prompt of each length (logits of the last
token only), median of ``--repeats`` after one warm-up.

    python profiling/bench_hf_prefill.py [--lengths 512,2048,8000] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

PEERS = Path(os.environ.get("JAXINFER_PEERS", Path.home() / ".cache" / "jaxinfer-peers"))
CODE = """
import statistics, sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], gguf_file=sys.argv[2], dtype=torch.float32).eval()
for length in map(int, sys.argv[3].split(",")):
    x = torch.randint(100, 40000, (1, length))
    times = []
    with torch.inference_mode():
        for _ in range(int(sys.argv[4]) + 1):
            start = time.perf_counter()
            model(input_ids=x, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    print(length, length / statistics.median(times[1:]), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048,8000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "hf_prefill.json"))
    args = parser.parse_args()
    python = PEERS / "venv-hf" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"no HF environment at {python}: run ../shared/peers/setup.sh first")
    out = subprocess.run([str(python), "-c", CODE, str(PEERS / "model"), "SmolLM2-135M-Instruct.Q4_1.gguf",
                          args.lengths, str(args.repeats)], capture_output=True, text=True, check=True).stdout
    rows = {int(length): float(rate) for length, rate in (line.split() for line in out.strip().splitlines())}
    print(f"{'prompt':>7} {'HF f32 prefill tok/s':>21}")
    for length, rate in rows.items():
        print(f"{length:>7} {rate:>21.1f}")
    Path(args.json).write_text(json.dumps(dict(
        peer="HF transformers f32 (sdpa, 2 threads)", prefill_tok_s=rows, repeats=args.repeats,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
