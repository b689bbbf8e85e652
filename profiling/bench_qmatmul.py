"""Matmul time of a SmolLM2-135M decode step: the FFI quantized kernels against XLA.

The skeleton chains the model's matmul shapes inside ONE jax.jit: 30 layers of qkv 576->960,
o 576->576, gate_up 576->3072 and down 1536->576 (each layer its own weights, so they stream from
memory as in the engine), then the tied head 576->49152, with light glue (rms rescale, residual
adds, a SiLU-gated product, an argmax over the logits). Weights: Q4_1 layers + Q8_0 head (the
embedded GGUF's formats, 96.4 MB) for the quantized routes, float32 [N, K] (538 MB) for XLA f32.

Routes: ``ffi-<isa>`` the kernels with int8 activations (``ffi-<isa>-f32act``: float32
activations, with --f32act), ``xla-f32`` dense einsum, ``xla-dequant`` dequantize + einsum (the
fallback path). Reported per M (rows = tokens per step): ms per call (median and best),
matmul-only tokens/s (M / median), GB/s of weights read and GFLOP/s, and other_cores (CPU time
of other processes during the timed loop, in cores: the machine is shared).

    python profiling/bench_qmatmul.py [--rows 1,8,32,512] [--routes ffi,xla-f32,xla-dequant]
        [--isas avx2,avx512] [--threads 0] [--layer-qtype q4_1] [--seconds 3] [--wait-idle 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.layers import quant

REPO = Path(__file__).resolve().parent.parent
HIDDEN, QKV, FFN, VOCAB, LAYERS = 576, 960, 1536, 49152, 30
LAYER_TYPE, HEAD_TYPE = "q4_1", "q8_0"
# (name, out features, in features) per layer
SHAPES = (("qkv", QKV, HIDDEN), ("o", HIDDEN, HIDDEN), ("gate_up", 2 * FFN, HIDDEN), ("down", HIDDEN, FFN))


def make_weights(seed: int = 0) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(seed)
    layers = [{name: (rng.standard_normal((n, k), np.float32) / np.sqrt(k)).astype(np.float32)
               for name, n, k in SHAPES} for _ in range(LAYERS)]
    head = (rng.standard_normal((VOCAB, HIDDEN), np.float32) / np.sqrt(HIDDEN)).astype(np.float32)
    return layers, head


def rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5)


def skeleton(matmul):
    """step(x [M, 576], weights) -> argmax tokens [M], with ``matmul(x, w, kind)`` for every linear."""

    def step(x, layers, head):
        for layer in layers:
            qkv = matmul(rms(x), layer["qkv"], "layer")
            x = x + matmul(qkv[:, :HIDDEN], layer["o"], "layer")
            gate, up = jnp.split(matmul(rms(x), layer["gate_up"], "layer"), 2, axis=-1)
            x = x + matmul(jax.nn.silu(gate) * up, layer["down"], "layer")
        return jnp.argmax(matmul(rms(x), head, "head"), axis=-1)

    return jax.jit(step)


def route(name: str, threads: int, layer_qtype: str = LAYER_TYPE):
    """(matmul fn, weight preparation) of a route."""
    if name == "xla-f32":
        def mm(x, w, kind):
            return jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32)
        return mm, lambda w, kind: jnp.asarray(w)
    qtype = {"layer": layer_qtype, "head": HEAD_TYPE}
    prepare = lambda w, kind: jnp.asarray(quant.quantize(w, qtype[kind]))  # noqa: E731
    if name == "xla-dequant":
        def mm(x, w, kind):
            return jnp.einsum("mk,nk->mn", x, quant.dequantize(w, qtype[kind]), preferred_element_type=jnp.float32)
        return mm, prepare
    _, isa, *rest = name.split("-")
    activations = "float32" if rest == ["f32act"] else "int8"

    def mm(x, w, kind):
        return quant.qmatmul(x, w, qtype[kind], activations=activations, isa=isa, num_threads=threads)
    return mm, prepare


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_busy_seconds() -> float:
    """CPU time of the whole machine (all processes) from /proc/stat, in seconds."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(timeout: float, window: float = 1.0, max_other: float = 0.2) -> None:
    """Wait (at most ``timeout`` s) until other processes used < ``max_other`` cores for ``window`` s."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        busy0, own0 = cpu_busy_seconds(), own_cpu_seconds()
        time.sleep(window)
        if (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0) < max_other * window:
            return


def time_calls(fn, args, seconds: float, min_calls: int = 5, wait_idle: float = 0.0) -> tuple[list[float], float]:
    fn(*args).block_until_ready()  # compile + warm up
    fn(*args).block_until_ready()
    if wait_idle > 0:
        wait_for_idle(wait_idle)
    times = []
    busy0, own0, start = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    other = max(0.0, (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0)) / wall
    return times, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,32,512", help="M values (tokens per step)")
    parser.add_argument("--routes", default="ffi,xla-f32,xla-dequant",
                        help="ffi (one route per isa), xla-f32, xla-dequant")
    parser.add_argument("--isas", default="", help="isas for the ffi routes (default: every one this host "
                                                   "runs but scalar, which runs only at M <= 8)")
    parser.add_argument("--f32act", action="store_true", help="also time the float32-activation kernels")
    parser.add_argument("--layer-qtype", default=LAYER_TYPE, choices=("q4_0", "q4_1", "q8_0"),
                        help="block type of the 30 layers (the head stays q8_0)")
    parser.add_argument("--threads", type=int, default=0, help="kernel threads (0: all of XLA's pool)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per configuration")
    parser.add_argument("--wait-idle", type=float, default=20.0,
                        help="wait up to this many seconds for other processes to go idle before each timing")
    parser.add_argument("--json", default=str(REPO / "profiling" / "results" / "qmatmul.json"))
    args = parser.parse_args()

    rows_list = [int(r) for r in args.rows.split(",")]
    supported = [isa for isa in quant.supported_isas() if isa != "auto"]
    isas = args.isas.split(",") if args.isas else supported
    routes = []
    for name in args.routes.split(","):
        if name == "ffi":
            if not quant.kernels_available():
                print("CPU kernels unavailable: skipping the ffi routes")
                continue
            routes += [f"ffi-{isa}" for isa in isas]
            routes += [f"ffi-{isa}-f32act" for isa in isas if args.f32act]
        else:
            routes.append(name)

    layers_f32, head_f32 = make_weights()
    params = sum(n * k for _, n, k in SHAPES) * LAYERS + VOCAB * HIDDEN
    results = []
    for name in routes:
        matmul, prepare = route(name, args.threads, args.layer_qtype)
        layers = [{key: prepare(w, "layer") for key, w in layer.items()} for layer in layers_f32]
        head = prepare(head_f32, "head")
        weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves((layers, head)))
        step = skeleton(matmul)
        for m in rows_list:
            if "scalar" in name and m > 8:
                continue
            x = jnp.asarray(np.random.default_rng(1).standard_normal((m, HIDDEN), np.float32))
            times, other = time_calls(step, (x, layers, head), args.seconds, wait_idle=args.wait_idle)
            median, best = statistics.median(times), min(times)
            row = {"route": name, "rows": m, "median_ms": 1e3 * median, "best_ms": 1e3 * best,
                   "tok_s": m / median, "weight_gb_s": weight_bytes / median / 1e9,
                   "gflop_s": 2 * params * m / median / 1e9, "weight_mb": weight_bytes / 1e6,
                   "calls": len(times), "other_cores": other}
            results.append(row)
            print(f"{name:<22} M={m:<4} {row['median_ms']:9.2f} ms (best {row['best_ms']:8.2f})"
                  f" {row['tok_s']:9.1f} tok/s {row['weight_gb_s']:6.1f} GB/s {row['gflop_s']:7.1f} GFLOP/s"
                  f"  other_cores {other:.2f}", flush=True)
        del layers, head

    print(f"\n{'route':<22}{'M':>5}{'median ms':>11}{'best ms':>9}{'tok/s':>9}{'GB/s':>7}{'GFLOP/s':>9}{'other':>7}")
    for row in results:
        print(f"{row['route']:<22}{row['rows']:>5}{row['median_ms']:>11.2f}{row['best_ms']:>9.2f}{row['tok_s']:>9.1f}"
              f"{row['weight_gb_s']:>7.1f}{row['gflop_s']:>9.1f}{row['other_cores']:>7.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "benchmark": "qmatmul", "date": datetime.date.today().isoformat(), "machine": cpu_model(),
        "cpus": os.cpu_count(), "jax": jax.__version__, "threads": args.threads,
        "model": "SmolLM2-135M matmul skeleton: 30 x (qkv 576->960, o 576->576, gate_up 576->3072, "
                 "down 1536->576) + head 576->49152",
        "quantized_routes": f"{args.layer_qtype} layers + {HEAD_TYPE} head",
        "params": params, "rows": results}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
