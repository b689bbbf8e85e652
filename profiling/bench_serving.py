"""Serving benchmark: a streaming OpenAI-compatible client for ``python -m jaxinfer.serve``, timed on the client.

Workloads (``--workloads``, comma-separated):

- ``streams8``: ``--rounds`` rounds of ``--concurrency`` concurrent streaming ``/v1/chat/completions`` requests
  (mt_bench first turns, ``--stream-tokens`` new tokens each, ignore_eos, temperature 0); each round waits for all
  of its requests. Output tok/s is the median over rounds of a round's completion tokens / its wall time.
- ``poisson``: open-loop Poisson arrivals at ``--rate`` requests/s, ``--num-requests`` chat requests (mt_bench
  cycled), max_tokens drawn uniformly from 32..256 (seeded), ignore_eos. Output tok/s = completion tokens /
  (last finish - first send).
- ``azure``: replays the first ``--azure-minutes`` of the Azure LLM conversation trace at its timestamps divided
  by ``--time-compress``: ``/v1/completions`` with token-id prompts of the trace's ContextTokens and max_tokens of
  its GeneratedTokens (ignore_eos), both scaled down uniformly so the longest request fits ``--max-context``.

TTFT is the time to the first chunk carrying tokens, ITL the gaps between successive token-carrying chunks,
pooled over requests (per token only if the server sends one token a chunk: compare ``token_chunks`` with
``completion_tokens``), E2E the time to the end of the stream. Completion tokens come from the usage chunk (or a
count of token-carrying chunks). Prints a table; writes JSON with per-request records.

    python -m jaxinfer.serve &
    python profiling/bench_serving.py [--url http://127.0.0.1:8000] [--workloads streams8,poisson,azure]
        [--rate 2.0] [--num-requests 64] [--azure-minutes 2] [--time-compress 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from jaxinfer.datasets import prompt_set
from jaxinfer.router.trace import load_azure

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("streams8", "poisson", "azure")
MAX_ERRORS = 5  # error texts kept per workload


@dataclasses.dataclass
class Result:
    max_tokens: int
    send: float = 0.0  # perf_counter at send
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    status: str = "error"
    error: str | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    chunks: int = 0  # token-carrying chunks
    round: int | None = None


def chunk_text(event: dict) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


async def stream_request(client: httpx.AsyncClient, endpoint: str, body: dict, timeout: float) -> Result:
    """One streaming request; never raises (failures land in Result.status/error)."""
    res = Result(max_tokens=body["max_tokens"])
    res.send = time.perf_counter()
    stamps: list[float] = []
    usage = None
    done = False
    try:
        async with asyncio.timeout(timeout), client.stream("POST", endpoint, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {text[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"stream error: {json.dumps(event['error'])[:300]}"
                    return res
                if chunk_text(event):
                    stamps.append(time.perf_counter())
                if event.get("usage"):
                    usage = event["usage"]
        end = time.perf_counter()
    except TimeoutError:
        res.error = f"timeout after {timeout:g} s"
        return res
    except Exception as exc:  # any failure is recorded, not raised
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res
    if not done:
        res.error = "stream ended without [DONE]"
        return res
    res.status, res.e2e = "ok", end - res.send
    res.ttft = stamps[0] - res.send if stamps else None
    res.itl, res.chunks = np.diff(stamps).tolist(), len(stamps)
    res.completion_tokens = usage.get("completion_tokens", len(stamps)) if usage else len(stamps)
    res.prompt_tokens = usage.get("prompt_tokens") if usage else None
    return res


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def completion_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None  # numpy's default: linear interpolation


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def to_ms(value: float | None) -> float | None:
    return None if value is None else 1000.0 * value


def summarize(results: list[Result], out_tok_s: float | None, wall: float, extra: dict | None = None) -> dict:
    ok = [r for r in results if r.status == "ok"]
    errors = [r.error for r in results if r.status != "ok"]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [gap for r in ok for gap in r.itl]
    e2e = [r.e2e for r in ok]
    return {"sent": len(results), "completed": len(ok), "failed": len(errors), "errors": errors[:MAX_ERRORS],
            "short_outputs": sum(r.completion_tokens < r.max_tokens for r in ok),
            "completion_tokens": sum(r.completion_tokens for r in ok),
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok), "token_chunks": sum(r.chunks for r in ok),
            "wall_s": wall, "output_tok_s": out_tok_s,
            "ttft_mean_ms": to_ms(mean(ttft)), "ttft_p99_ms": to_ms(percentile(ttft, 99)),
            "itl_mean_ms": to_ms(mean(itl)), "itl_p99_ms": to_ms(percentile(itl, 99)),
            "e2e_mean_s": mean(e2e), "e2e_p99_s": percentile(e2e, 99), **(extra or {})}


def records(results: list[Result], t0: float) -> list[dict]:
    out = []
    for r in results:
        rec = {"send_s": r.send - t0, "ttft_s": r.ttft, "e2e_s": r.e2e, "prompt_tokens": r.prompt_tokens,
               "completion_tokens": r.completion_tokens, "chunks": r.chunks, "max_tokens": r.max_tokens,
               "status": r.status}
        if r.round is not None:
            rec["round"] = r.round
        if r.error:
            rec["error"] = r.error
        out.append(rec)
    return out


def open_loop_rate(results: list[Result]) -> tuple[float | None, float]:
    """(output tok/s over first send .. last finish, that span in seconds)."""
    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return None, 0.0
    span = max(r.send + r.e2e for r in ok) - min(r.send for r in results)
    return sum(r.completion_tokens for r in ok) / span, span


async def open_loop(client: httpx.AsyncClient, requests: list[tuple[float, str, dict]], timeout: float,
                    t0: float) -> list[Result]:
    """Send each (offset s, endpoint, body) at t0 + offset without waiting for earlier ones to finish."""
    tasks = []
    for offset, endpoint, body in requests:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(stream_request(client, endpoint, body, timeout)))
    return list(await asyncio.gather(*tasks))


async def run_streams8(client, args, model: str, prompts: list[str]) -> dict:
    results, rates, t0 = [], [], time.perf_counter()
    for rnd in range(args.rounds):
        bodies = [chat_body(model, prompts[(rnd * args.concurrency + i) % len(prompts)], args.stream_tokens)
                  for i in range(args.concurrency)]
        start = time.perf_counter()
        batch = await asyncio.gather(*(stream_request(client, "/v1/chat/completions", b, args.timeout)
                                       for b in bodies))
        wall = time.perf_counter() - start
        for r in batch:
            r.round = rnd
        rates.append(sum(r.completion_tokens for r in batch if r.status == "ok") / wall)
        results += batch
    wall = time.perf_counter() - t0
    summary = summarize(results, float(np.median(rates)), wall, {"round_output_tok_s": rates})
    return {"summary": summary, "requests": records(results, t0)}


async def run_poisson(client, args, model: str, prompts: list[str]) -> dict:
    rng = np.random.default_rng(args.seed)
    offsets = np.cumsum(rng.exponential(1.0 / args.rate, args.num_requests))
    offsets -= offsets[0]  # the first request goes at once
    max_tokens = rng.integers(32, 257, args.num_requests)
    requests = [(float(offsets[i]), "/v1/chat/completions", chat_body(model, prompts[i % len(prompts)],
                                                                       int(max_tokens[i])))
                for i in range(args.num_requests)]
    t0 = time.perf_counter()
    results = await open_loop(client, requests, args.timeout, t0)
    rate, span = open_loop_rate(results)
    summary = summarize(results, rate, time.perf_counter() - t0, {"span_s": span, "rate": args.rate})
    return {"summary": summary, "requests": records(results, t0)}


def azure_requests(args) -> tuple[list[tuple[float, int, int]], float]:
    """[(arrival offset s, prompt tokens, output tokens)] of the trace's first minutes, and the length scale."""
    rows = [r for r in load_azure() if r.arrival < args.azure_minutes * 60]
    scale = min(1.0, (args.max_context - 1) / max(r.prompt_len + r.output_len for r in rows))
    return [(r.arrival / args.time_compress, max(1, int(r.prompt_len * scale)), max(1, int(r.output_len * scale)))
            for r in rows], scale


async def run_azure(client, args, model: str, prompts: list[str]) -> dict:
    trace, scale = azure_requests(args)
    rng = np.random.default_rng(args.seed)
    requests = [(t, "/v1/completions", completion_body(model, rng.integers(100, 10000, c).tolist(), g))
                for t, c, g in trace]
    t0 = time.perf_counter()
    results = await open_loop(client, requests, args.timeout, t0)
    rate, span = open_loop_rate(results)
    summary = summarize(results, rate, time.perf_counter() - t0,
                        {"span_s": span, "length_scale": scale, "trace_prompt_tokens": sum(c for _, c, _ in trace),
                         "trace_output_tokens": sum(g for _, _, g in trace)})
    return {"summary": summary, "requests": records(results, t0)}


async def wait_ready(client: httpx.AsyncClient, seconds: float) -> None:
    deadline, last = time.monotonic() + seconds, "no answer"
    while time.monotonic() < deadline:
        try:
            resp = await client.get("/health", timeout=5.0)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(1.0)
    raise RuntimeError(f"server at {client.base_url} not ready after {seconds:.0f} s ({last})")


async def bench(args) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        await wait_ready(client, args.wait_ready)
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        model = resp.json()["data"][0]["id"]
        prompt_source = prompt_set("mt_bench")
        prompts = prompt_source.prompts
        warm = await stream_request(client, "/v1/chat/completions", chat_body(model, prompts[0], 16), args.timeout)
        if warm.status != "ok":
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        print(f"model {model}; warm-up request {warm.e2e:.2f} s", file=sys.stderr)
        runners = {"streams8": run_streams8, "poisson": run_poisson, "azure": run_azure}
        out = {}
        for name in args.workloads:
            print(f"running {name} ...", file=sys.stderr)
            out[name] = await runners[name](client, args, model, prompts)
        return {"model": model, "prompts": prompt_source.source, "warmup_e2e_s": warm.e2e, "workloads": out}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(workloads: dict) -> None:
    print(f"{'workload':<10}{'ok/sent':>10}{'out tok/s':>11}{'TTFT mean ms':>14}{'TTFT p99 ms':>13}"
          f"{'ITL mean ms':>13}{'ITL p99 ms':>12}{'E2E p99 s':>11}")
    for name, w in workloads.items():
        s = w["summary"]
        print(f"{name:<10}{s['completed']:>5}/{s['sent']:<4}{fmt(s['output_tok_s'], '.1f'):>11}"
              f"{fmt(s['ttft_mean_ms'], '.1f'):>14}{fmt(s['ttft_p99_ms'], '.1f'):>13}{fmt(s['itl_mean_ms'], '.2f'):>13}"
              f"{fmt(s['itl_p99_ms'], '.2f'):>12}{fmt(s['e2e_p99_s'], '.2f'):>11}")
        for err in s["errors"]:
            print(f"  {name} error: {err}")
        if name == "azure":
            print(f"  azure length scale {s['length_scale']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--workloads", default="streams8,poisson", help=f"comma-separated, of {','.join(WORKLOADS)}")
    parser.add_argument("--concurrency", type=int, default=8, help="streams8: concurrent requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="streams8: rounds")
    parser.add_argument("--stream-tokens", type=int, default=128, help="streams8: new tokens per request")
    parser.add_argument("--rate", type=float, default=2.0, help="poisson: requests per second")
    parser.add_argument("--num-requests", type=int, default=64, help="poisson: requests")
    parser.add_argument("--azure-minutes", type=float, default=2.0, help="azure: minutes of the trace to replay")
    parser.add_argument("--time-compress", type=float, default=1.0, help="azure: divide trace timestamps by this")
    parser.add_argument("--max-context", type=int, default=2048, help="azure: longest prompt+output after scaling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--wait-ready", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--json", default=str(REPO / "profiling" / "results" / "serving.json"))
    args = parser.parse_args()
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for name in ("concurrency", "rounds", "stream_tokens", "num_requests", "max_context"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rate <= 0 or args.time_compress <= 0 or args.azure_minutes <= 0:
        parser.error("--rate, --time-compress and --azure-minutes must be > 0")
    try:
        result = asyncio.run(bench(args))
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    print_table(result["workloads"])
    record = {"benchmark": "serving", "date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "url": args.url,
              "args": vars(args), **result}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
