"""Request traces for router studies: the Azure LLM inference traces (CSV), the Mooncake traces (JSONL)
and a synthetic long-context mix, plus helpers to reshape them (pure Python + numpy, no jax).

A trace is a list of ``TraceRequest(arrival, prompt_len, output_len)``, arrivals in seconds from the
first request, sorted. Mooncake files hold one JSON object a line, ``{"timestamp": <ms, relative>,
"input_length": N, "output_length": M, "hash_ids": [...]}``; the prefix-block ``hash_ids`` are not kept.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxinfer.datasets import TRACES, trace_file

TRACE_NAMES = tuple(TRACES)  # the shared folder's traces, by name
_AZURE_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")


class TraceRequest(NamedTuple):
    arrival: float  # seconds from the trace's start
    prompt_len: int
    output_len: int


def load_azure(path: str | Path | None = None, limit: int | None = None) -> list[TraceRequest]:
    """The Azure trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens; timestamps like
    ``2023-11-16 18:15:46.6805900``), by default the shared folder's conversation trace. Outputs of 0
    tokens become 1 (every request emits a token)."""
    path = trace_file("azure_conv") if path is None else Path(path)
    if not path.is_file():
        raise ValueError(f"trace file not found: {path}")
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != _AZURE_HEADER:
            raise ValueError(f"{path}: expected header {','.join(_AZURE_HEADER)}, got {header}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                stamp, prompt, output = row
                rows.append((_seconds(stamp.strip()), int(prompt), int(output)))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: malformed row {row}") from None
            if rows[-1][1] < 1 or rows[-1][2] < 0:
                raise ValueError(f"{path}:{line_no}: lengths must be prompt >= 1 and output >= 0, got {row}")
    return _requests(path, rows)


def load_mooncake(path: str | Path | None = None, limit: int | None = None) -> list[TraceRequest]:
    """A Mooncake trace (JSONL, see the module docstring), by default the shared folder's conversation
    trace. Millisecond timestamps become seconds; outputs of 0 tokens become 1, as in ``load_azure``."""
    path = trace_file("mooncake_conversation") if path is None else Path(path)
    if not path.is_file():
        raise ValueError(f"trace file not found: {path}")
    rows: list[tuple[float, int, int]] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in _MOONCAKE_KEYS if k not in record]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing key {', '.join(missing)}")
            stamp, prompt, output = (record[k] for k in _MOONCAKE_KEYS)
            if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
                raise ValueError(f"{path}:{line_no}: timestamp must be a number of milliseconds, got {stamp!r}")
            for key, value in (("input_length", prompt), ("output_length", output)):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{path}:{line_no}: {key} must be an integer, got {value!r}")
            if stamp < 0 or prompt < 1 or output < 0:
                raise ValueError(f"{path}:{line_no}: need timestamp >= 0, input_length >= 1 and output_length >= 0, "
                                 f"got {stamp!r}, {prompt}, {output}")
            rows.append((stamp / 1000, prompt, output))
    return _requests(path, rows)


def load_trace(name: str, limit: int | None = None) -> list[TraceRequest]:
    """One of the shared folder's traces by name (``TRACE_NAMES``); FileNotFoundError if it is missing there."""
    if name not in TRACE_NAMES:
        raise ValueError(f"unknown trace {name!r} (choices: {', '.join(TRACE_NAMES)})")
    load = load_azure if name.startswith("azure_") else load_mooncake
    return load(trace_file(name), limit)


def _requests(path: Path, rows: list[tuple[float, int, int]]) -> list[TraceRequest]:
    """(absolute seconds, prompt, output) rows as a trace: sorted, re-based to 0, outputs at least 1."""
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return [TraceRequest(t - start, p, max(o, 1)) for t, p, o in rows]


def _seconds(stamp: str) -> float:
    """Seconds since the epoch of ``YYYY-MM-DD HH:MM:SS[.fraction]`` (any number of fraction digits)."""
    whole, _, fraction = stamp.partition(".")
    base = datetime.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.UTC)
    if fraction and not fraction.isdigit():
        raise ValueError(f"bad timestamp {stamp!r}")
    return base.timestamp() + (float("0." + fraction) if fraction else 0.0)


def scale_rate(requests: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same requests arriving ``factor`` times as fast (time compressed by ``factor``)."""
    if not factor > 0:
        raise ValueError(f"rate factor must be positive, got {factor}")
    return [r._replace(arrival=r.arrival / factor) for r in requests]


def take(requests: list[TraceRequest], *, start: float = 0.0, duration: float | None = None,
         count: int | None = None) -> list[TraceRequest]:
    """Requests arriving in [start, start + duration), at most ``count`` of them, re-based to start at 0."""
    end = math.inf if duration is None else start + duration
    out = [r for r in requests if start <= r.arrival < end]
    if count is not None:
        out = out[:count]
    if not out:
        return []
    first = out[0].arrival
    return [r._replace(arrival=r.arrival - first) for r in out]


def cap_lengths(requests: list[TraceRequest], max_len: int) -> list[TraceRequest]:
    """Fit every request into ``max_len`` tokens of context: prompts cut to max_len - 1, then outputs."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    out = []
    for r in requests:
        prompt = min(r.prompt_len, max_len - 1)
        out.append(r._replace(prompt_len=prompt, output_len=max(1, min(r.output_len, max_len - prompt))))
    return out


def stretch(requests: list[TraceRequest], factor: float, max_len: int) -> list[TraceRequest]:
    """Prompt and output lengths multiplied by ``factor`` (e.g. to turn a chat trace into a
    long-context one), then capped to ``max_len``."""
    if not factor > 0:
        raise ValueError(f"stretch factor must be positive, got {factor}")
    scaled = [r._replace(prompt_len=max(1, round(r.prompt_len * factor)),
                         output_len=max(1, round(r.output_len * factor))) for r in requests]
    return cap_lengths(scaled, max_len)


def long_context_mix(num_requests: int, rate: float, *, seed: int = 0, min_len: int = 1024,
                     max_len: int = 131072, long_fraction: float = 0.15,
                     median_output: int = 256) -> list[TraceRequest]:
    """A skewed long-context workload: Poisson arrivals at ``rate`` req/s; prompts log-uniform in
    [min_len, 8*min_len) for most requests and log-uniform in [8*min_len, max_len/2) for a
    ``long_fraction`` tail; outputs log-normal around ``median_output`` (the context stays <= max_len)."""
    if num_requests < 1 or not rate > 0 or not 0 <= long_fraction <= 1 or not 1 <= min_len < max_len // 16:
        raise ValueError(f"need num_requests >= 1, rate > 0, 0 <= long_fraction <= 1, 1 <= min_len < max_len/16; "
                         f"got {num_requests}, {rate}, {long_fraction}, {min_len}, {max_len}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, num_requests))
    arrivals -= arrivals[0]
    long = rng.random(num_requests) < long_fraction
    lo = np.where(long, 8 * min_len, min_len)
    hi = np.where(long, max_len // 2, 8 * min_len)
    prompts = np.exp(rng.uniform(np.log(lo), np.log(hi))).astype(int)
    outputs = np.clip(rng.lognormal(np.log(median_output), 0.8, num_requests), 1, None).astype(int)
    out = [TraceRequest(float(t), int(p), int(o)) for t, p, o in zip(arrivals, prompts, outputs, strict=True)]
    return cap_lengths(out, max_len)


def summarize(requests: list[TraceRequest]) -> dict:
    """Count, duration, rate and length percentiles of a trace (for reports)."""
    if not requests:
        return {"requests": 0}
    p = np.array([r.prompt_len for r in requests])
    o = np.array([r.output_len for r in requests])
    duration = requests[-1].arrival - requests[0].arrival
    return {"requests": len(requests), "duration_s": duration, "rate_rps": len(requests) / max(duration, 1e-9),
            "prompt_mean": float(p.mean()), "prompt_p50": float(np.median(p)),
            "prompt_p99": float(np.percentile(p, 99)),
            "output_mean": float(o.mean()), "context_max": int((p + o).max())}
