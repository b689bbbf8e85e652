"""Measured step costs of a replica's engine: the data of the router's cost model
(jaxinfer.router.cost_model). Times the engine's own compiled step functions on its own bucketed
shapes, and how much replicas that share one host slow each other down. A profiling tool (used by
launch/profile_cost_model.py, profiling/bench_cluster.py and the simulator-validation test), not
part of the library: run its callers from the repository root with PYTHONPATH=.
"""

from __future__ import annotations

import datetime
import os
import platform
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxinfer.engine.batch import STOP_WIDTH, BurstInput, StepShape
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.model_runner import Chain
from jaxinfer.engine.scheduler import SchedulerOutput
from jaxinfer.engine.sequence import Sequence as Seq
from jaxinfer.sampling_params import SamplingParams


def decode_rows(lengths: Sequence[int], page_size: int, num_pages: int) -> list[Seq]:
    """Decoding requests at these context lengths, each on its own pages while the pool has them
    (then the page ids wrap around: rows read the same KV, which only the time depends on)."""
    seqs, next_page = [], 0
    for row, length in enumerate(lengths):
        seq = Seq(f"r{row}", [1 + (i % 97) for i in range(length)], SamplingParams(seed=row))
        pages = -(-length // page_size)
        seq.pages = [(next_page + i) % num_pages for i in range(pages)]
        seq.num_computed, seq.slot = length - 1, row
        next_page += pages
        seqs.append(seq)
    return seqs


def step_seconds(engine: Engine, shape: StepShape, repeats: int = 3,
                 lengths: Sequence[int] | None = None) -> float:
    """Median time of one compiled step (forward and sampling) of ``shape``; of a decode shape that
    runs as bursts, a full burst's time per step. Decode rows read ``lengths`` tokens of context
    each (default: every row at the shape's KV bucket, less the burst's steps, so the burst stays
    inside it); a prompt step runs on empty inputs (it costs what its padded shape costs)."""
    runner = engine.runner
    forward, sampler = runner.executable(shape)
    steps = runner.burst_steps if sampler is None else 1
    out = SchedulerOutput([], [], [])
    if shape.num_decode:
        if lengths is None:
            lengths = [max(shape.decode_kv_tokens - steps, 1)] * shape.num_decode
        blocks = engine.block_manager
        out = SchedulerOutput(decode_rows(lengths, blocks.page_size, blocks.num_pages), [], [])
    batch = runner.builder.build(out, shape, impl=runner.impl, interpret=runner.interpret)
    if sampler is None:  # every row runs all steps
        rows = shape.num_decode
        burst = BurstInput(budget=np.full(rows, steps, np.int32), stop_ids=np.full((rows, STOP_WIDTH), -1, np.int32))
        chain = Chain(batch.tokens, np.ones(rows, bool))
    times = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        start = time.perf_counter()
        if sampler is None:
            results, runner.kv, runner.sampler = forward(runner.state, runner.kv, runner.sampler, batch, burst, chain)
        else:
            logits, runner.kv, runner.sampler = forward(runner.state, runner.kv, runner.sampler, batch)
            results, runner.sampler = sampler(logits, runner.sampler, batch.sample)
        jax.block_until_ready(results)
        times.append((time.perf_counter() - start) / steps)
    return float(np.median(times[1:]))


def monotone(table: Sequence[Sequence[float]]) -> list[list[float]]:
    """A step-time grid made non-decreasing along both axes (more rows or more context never makes a
    step cheaper; a dip is the host's noise, e.g. another process during one shape's timing)."""
    grid = np.maximum.accumulate(np.maximum.accumulate(np.asarray(table, float), axis=0), axis=1)
    return grid.tolist()


def mix_padding(engine: Engine, rows: int, short: int, long: int, repeats: int = 5) -> float:
    """How much of a length-mixed decode batch's spread its step pays for, in [0, 1]: one row at
    ``long`` among rows at ``short``, against homogeneous batches at the mixed batch's mean length
    (0: the step follows the summed context) and at ``long`` (1: every row costs the longest), on
    one compiled shape (the cost model's ``decode_mix_padding``). Two interleaved passes, the faster
    of each (a VM's speed drifts between runs)."""
    shape = StepShape(rows, long, 0, 0)
    long = max(long - engine.runner.burst_steps, short)  # a burst's rows stay inside the KV bucket
    mixed = [long] + [short] * (rows - 1)
    mean = int(round(np.mean(mixed)))
    cases = {"mixed": mixed, "mean": [mean] * rows, "long": [long] * rows}
    best = {name: min(step_seconds(engine, shape, repeats, lengths) for _ in range(2))
            for name, lengths in cases.items()}
    spread = best["long"] - best["mean"]
    return float(np.clip((best["mixed"] - best["mean"]) / spread, 0.0, 1.0)) if spread > 0 else 1.0


def host_parallelism(engines: Sequence[Engine], shape: StepShape, repeats: int = 5) -> float:
    """Cores a step of ``shape`` keeps busy: from how much longer it takes while every replica runs it
    at once on a host of os.cpu_count() cores (even sharing: stretch = parallelism x replicas / cores)."""
    alone = step_seconds(engines[0], shape, repeats)
    together = [0.0] * len(engines)

    def run(index: int) -> None:
        together[index] = step_seconds(engines[index], shape, repeats)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stretch = float(np.mean(together)) / alone
    return float(np.clip(stretch * (os.cpu_count() or 1) / len(engines), 0.1, os.cpu_count() or 1))


def profile(engines: Sequence[Engine], *, decode_batch: Sequence[int], decode_kv: Sequence[int],
            prefill_tokens: Sequence[int], prefill_kv: Sequence[int], model: str = "", repeats: int = 3,
            overhead: float = 0.0, log=None) -> dict:
    """A cost model (CostModel JSON) of the first engine's step shapes; with several engines on one
    host (CPU replicas), also how they share its cores. ``overhead``: host seconds added to every step
    (scheduling and bookkeeping around the compiled function)."""
    engine = engines[0]

    def timed(shape: StepShape) -> float:
        seconds = step_seconds(engine, shape, repeats) + overhead
        if log is not None:
            log(f"{shape}: {1e3 * seconds:.1f} ms")
        return seconds
    decode = monotone([[timed(StepShape(b, s, 0, 0)) for s in decode_kv] for b in decode_batch])
    prefill = monotone([[timed(StepShape(0, 0, t, s)) for s in prefill_kv] for t in prefill_tokens])
    mix_rows = max([b for b in decode_batch if b <= 8], default=decode_batch[0])
    mix = mix_padding(engine, mix_rows, max(decode_kv[-1] // 16, 1), decode_kv[-1], repeats)
    if log is not None:
        log(f"decode_mix_padding ({mix_rows} rows, one at {decode_kv[-1]}): {mix:.3f}")
    config, blocks = engine.scheduler_config, engine.block_manager
    result = {
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{jax.devices()[0].platform}",
        "model": model, "dtype": str(engine.runner.kv.k.dtype), "date": datetime.date.today().isoformat(),
        "page_size": blocks.page_size, "kv_bytes_per_token": engine.bytes_per_page // blocks.page_size,
        "kv_capacity_tokens": blocks.num_pages * blocks.page_size, "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "decode": {"batch": list(decode_batch), "kv_len": list(decode_kv), "seconds": decode},
        "prefill": {"tokens": list(prefill_tokens), "kv_len": list(prefill_kv), "seconds": prefill},
        "copy_bytes_per_second": 1e9, "mixed_prefill_kv": list(config.mixed_kv_buckets), "decode_mix_padding": mix}
    if len(engines) > 1:
        result["copy_bytes_per_second"] = copy_bandwidth(engines)
        if jax.devices()[0].platform == "cpu":  # the replicas are virtual devices of one host
            result["host"] = {
                "cores": os.cpu_count() or 1, "replicas_measured": len(engines),
                "decode_parallelism": host_parallelism(engines, StepShape(decode_batch[0], decode_kv[0], 0, 0)),
                "prefill_parallelism": host_parallelism(engines, StepShape(0, 0, prefill_tokens[-1], prefill_kv[0]))}
    return result


def copy_bandwidth(engines: Sequence[Engine], pages: int = 64, repeats: int = 3) -> float:
    """Bytes/s of a KV migration between two replicas: export (gather), device-to-device copy,
    import (scatter) of ``pages`` pages."""
    src, dst = engines[0].runner, engines[1].runner
    ids = list(range(min(pages, src.page_buckets()[-1], engines[0].block_manager.num_pages,
                         engines[1].block_manager.num_pages)))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.import_pages(ids, src.export_pages(ids, dst.kv_sharding))
        jax.block_until_ready(dst.kv.k)
        times.append(time.perf_counter() - start)
    return len(ids) * engines[0].bytes_per_page / float(np.median(times[1:]))


def calibrate(profile_dict: dict, logs: Sequence[list]) -> dict:
    """Fit the host model to a real run: the cores a decode step and a prefill step keep busy and the
    host time around a step beyond the compiled step (scheduling, batch building,
    streaming, the other replicas' Python threads), from the step logs (``Engine.step_log`` of each
    replica, run side by side). Returns the profile with ``host`` and ``step_overhead_seconds`` set."""
    from jaxinfer.router.cost_model import CostModel

    steps = _busy_steps(logs)
    cores = os.cpu_count() or 1
    best = None
    grid = np.linspace(0.5, cores, 10)
    for decode_parallelism, prefill_parallelism in ((d, p) for d in grid for p in grid):
        host = {"cores": cores, "decode_parallelism": float(decode_parallelism),
                "prefill_parallelism": float(prefill_parallelism)}
        model = CostModel.from_dict({**profile_dict, "host": host, "step_overhead_seconds": 0.0})
        stretched = np.array([_stretched(model, shape, busy, contexts) for shape, busy, _, contexts in steps])
        residuals = np.array([seconds for _, _, seconds, _ in steps]) - stretched
        overhead = max(float(np.median(residuals)), 0.0)
        score = float(np.mean(np.abs(residuals - overhead)))
        if best is None or score < best[0]:
            best = (score, host, overhead)
    _, host, overhead = best
    return {**profile_dict, "host": {**host, "calibrated_steps": len(steps)}, "step_overhead_seconds": overhead}


def host_drift(profile_dict: dict, logs: Sequence[list]) -> tuple[float, float]:
    """How much slower (> 1) or faster the host ran the logged steps than the cost model predicts for
    them, as (decode factor, prefill factor): real over modelled seconds of the decode-only steps
    (host overhead included), then of the steps with prompt tokens once their decode part is
    scaled by the first factor; over the steps of the logs (each replica's ``Engine.step_log``, run
    side by side). On a shared host the machine's speed wanders between a profile and a later run,
    and other processes slow prefill (compute-bound) and decode (memory-bound) steps by different
    amounts; these two scalars measure that without looking at any request's latency."""
    from jaxinfer.router.cost_model import CostModel

    model = CostModel.from_dict(profile_dict)
    decode_real = decode_model = rest_real = rest_decode = rest_prefill = 0.0
    for shape, busy, seconds, contexts in _busy_steps(logs):
        decode, prefill = _parts(model, shape, contexts)
        stretch = model.host_slowdown(busy)
        decode, prefill = decode * stretch[0] + model.step_overhead, prefill * stretch[1]
        if prefill:
            rest_real, rest_decode, rest_prefill = rest_real + seconds, rest_decode + decode, rest_prefill + prefill
        else:
            decode_real, decode_model = decode_real + seconds, decode_model + decode
    total = decode_model + rest_decode + rest_prefill
    if not total:
        raise ValueError("host_drift needs at least one logged step")
    overall = (decode_real + rest_real) / total
    decode_factor = decode_real / decode_model if decode_model else overall
    prefill_factor = (rest_real - decode_factor * rest_decode) / rest_prefill if rest_prefill else overall
    if prefill_factor <= 0:  # the steps with prompt tokens took less than their decode part alone
        return overall, overall
    return decode_factor, prefill_factor


def rescaled(profile_dict: dict, decode_factor: float, prefill_factor: float) -> dict:
    """The profile with decode step times and the per-step overhead times ``decode_factor`` and
    prefill step times times ``prefill_factor``."""
    def scale(section: dict, factor: float) -> dict:
        return {**section, "seconds": [[t * factor for t in row] for row in section["seconds"]]}
    result = {**profile_dict, "decode": scale(profile_dict["decode"], decode_factor),
              "prefill": scale(profile_dict["prefill"], prefill_factor)}
    if "step_overhead_seconds" in profile_dict:
        result["step_overhead_seconds"] = profile_dict["step_overhead_seconds"] * decode_factor
    return result


def _busy_steps(logs: Sequence[list]) -> list:
    """(shape, steps running at its start on the host including itself, seconds, decode rows' contexts)
    of every logged step."""
    intervals = [(entry[1], entry[2]) for log in logs for entry in log]
    return [(shape, sum(1 for s, e in intervals if s <= start < e), end - start, contexts)
            for log in logs for shape, start, end, contexts in log]


def _parts(model, shape: StepShape, contexts) -> tuple[float, float]:
    """A logged step's modelled (decode, prefill) seconds: its real decode rows at their contexts
    (the shape's KV bucket for a step logged without them)."""
    rows = len(contexts) or shape.num_decode
    longest = max(contexts, default=shape.decode_kv_tokens)
    mean = sum(contexts) / len(contexts) if contexts else None
    return model.step_parts(rows, longest, shape.num_prefill_tokens, shape.prefill_kv_tokens, mean)


def _stretched(model, shape: StepShape, busy: int, contexts) -> float:
    decode, prefill = _parts(model, shape, contexts)
    stretch = model.host_slowdown(busy)
    return decode * stretch[0] + prefill * stretch[1]
