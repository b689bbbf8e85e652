"""Start-up of ``python -m jaxinfer.serve``: seconds from launch to the ready line, to the first token
of a chat request sent as soon as the port answers, and to the end of the background compile, for a
cold start (no compilation cache: every step shape compiles) and a warm restart (the cache filled by
the run before). The weights and the CPU kernels are already on disk, as after the first run.

    python profiling/bench_start.py [--modes cold,warm] [--extra-args "--max-num-seqs 8"] [--json FILE]

Prints a table; writes JSON (default profiling/results/start.json). Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
            "stream": True}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_once(env: dict, extra: list[str], timeout: float) -> dict:
    """Launch the server, ask one streamed question as soon as it is ready, wait for the background
    compile to end; returns the seconds of each milestone."""
    port = free_port()
    command = [sys.executable, "-m", "jaxinfer.serve", "--http-port", str(port), "--grpc-port", "0", *extra]
    launched = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    marks: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip())
            now = time.perf_counter() - launched
            if line.startswith("jaxinfer ready"):
                marks["ready_s"] = now
            elif "compiled the other" in line:
                marks["all_compiled_s"] = now
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = launched + timeout
        while "ready_s" not in marks:
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError("server did not become ready:\n" + "\n".join(lines[-20:]))
            time.sleep(0.05)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=QUESTION,
                          timeout=timeout) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data:") and '"content"' in line:
                    marks.setdefault("first_token_s", time.perf_counter() - launched)
        while "all_compiled_s" not in marks and time.perf_counter() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(60)
    marks["log"] = [line for line in lines if "compil" in line or "ready" in line or "loaded" in line]
    return marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="cold,warm")
    parser.add_argument("--extra-args", default="", help="more flags for jaxinfer.serve")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", default=str(ROOT / "profiling" / "results" / "start.json"))
    args = parser.parse_args()
    extra = shlex.split(args.extra_args)
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        for mode in args.modes.split(","):
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            if mode == "cold":
                env["JAXINFER_COMPILATION_CACHE"] = "0"
            elif mode == "warm":  # fill a fresh XLA cache first, then measure the restart
                env["JAXINFER_XLA_CACHE"] = cache
                start_once(env, extra, args.timeout)
            else:
                raise SystemExit(f"unknown mode {mode!r} (cold, warm)")
            results[mode] = start_once(env, extra, args.timeout)
    print(f"{'start':>6} {'ready s':>8} {'first token s':>14} {'all shapes compiled s':>22}")
    for mode, r in results.items():
        compiled = f"{r['all_compiled_s']:.1f}" if "all_compiled_s" in r else "-"
        print(f"{mode:>6} {r['ready_s']:>8.1f} {r.get('first_token_s', float('nan')):>14.1f} {compiled:>22}")
    record = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), extra_args=extra,
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), results=results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
