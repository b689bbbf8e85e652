"""Prometheus metrics of one server: request outcomes and latencies recorded by the frontend, engine
gauges read from the engine's latest snapshot at scrape time. Each server owns its registry."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxinfer.engine.engine import EngineMetrics

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
THROUGHPUT_WINDOW_S = 10.0


class ServingMetrics:
    """Counters and histograms per API; ``status`` is a finish reason or an error kind."""

    def __init__(self, engine_metrics: Callable[[], EngineMetrics | None], in_flight: Callable[[], int],
                 cluster: Callable[[], object] = lambda: None):
        """engine_metrics: the engine's snapshot, None while the server warms up; cluster: returns the
        Cluster of replica groups (None with one engine)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("jaxinfer_requests", "Requests by API and final status", ("api", "status"),
                                registry=self.registry)
        self.ttft = Histogram("jaxinfer_time_to_first_token_seconds", "Arrival to first generated token",
                              ("api",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("jaxinfer_inter_token_latency_seconds", "Time between streamed tokens",
                             ("api",), buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("jaxinfer_e2e_request_latency_seconds", "Arrival to last token",
                             ("api",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self._engine = _EngineCollector(engine_metrics, in_flight)
        self.registry.register(self._engine)
        self.registry.register(_ClusterCollector(cluster))

    def sample(self) -> None:
        """Record the token counters now (the server calls this every second for the tokens/s gauges)."""
        self._engine.sample()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges and token counters from the engine's latest metrics snapshot, plus tokens/s over the
    last ``THROUGHPUT_WINDOW_S`` seconds of samples."""

    def __init__(self, engine_metrics: Callable[[], EngineMetrics | None], in_flight: Callable[[], int]):
        self._engine_metrics = engine_metrics
        self._in_flight = in_flight
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def describe(self) -> Iterator:
        return iter(())  # collected lazily: the engine may not exist yet when the registry is built

    def collect(self) -> Iterator:
        m = self._engine_metrics()
        yield GaugeMetricFamily("jaxinfer_engine_ready", "1 once the model is loaded and compiled, 0 while warming up",
                                value=float(m is not None))
        if m is None:
            return
        gauges = {
            "jaxinfer_requests_running": ("Requests being generated", m.num_running),
            "jaxinfer_requests_waiting": ("Requests queued for admission (queue depth)", m.num_waiting),
            "jaxinfer_requests_in_flight": ("Requests open on the APIs", self._in_flight()),
            "jaxinfer_kv_cache_usage_ratio": ("Share of KV pages in use", m.kv_pages_used / max(1, m.kv_pages_total)),
            "jaxinfer_kv_pages_used": ("KV pages in use", m.kv_pages_used),
            "jaxinfer_kv_pages_total": ("KV pages in the pool", m.kv_pages_total),
            "jaxinfer_prefix_cache_hit_ratio": ("Prompt tokens served from the prefix cache", m.prefix_cache_hit_rate),
            "jaxinfer_last_step_seconds": ("Duration of the latest engine step", m.last_step_seconds),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "jaxinfer_prompt_tokens": ("Prompt tokens prefilled", m.prompt_tokens_total),
            "jaxinfer_generation_tokens": ("Tokens generated", m.generated_tokens_total),
            "jaxinfer_engine_steps": ("Engine steps run", m.num_steps),
            "jaxinfer_preemptions": ("Requests preempted for KV space", m.num_preemptions),
            "jaxinfer_spec_rounds": ("Speculative verification steps", m.spec_rounds),
            "jaxinfer_spec_verified_tokens": ("Draft-tree nodes verified by the target", m.spec_verified_tokens),
            "jaxinfer_spec_accepted_tokens": ("Draft tokens accepted", m.spec_accepted_tokens),
            "jaxinfer_spec_fallback_steps": ("Decode steps that did not speculate (batch too large, penalties)",
                                             m.spec_fallback_steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        prompt_rate, generation_rate = self._rates()
        yield GaugeMetricFamily("jaxinfer_prompt_tokens_per_second", "Prompt tokens/s over the last 10 s",
                                value=prompt_rate)
        yield GaugeMetricFamily("jaxinfer_generation_tokens_per_second", "Generated tokens/s over the last 10 s",
                                value=generation_rate)

    def sample(self) -> None:
        m = self._engine_metrics()
        if m is None:
            return
        now = time.monotonic()
        self._samples.append((now, m.prompt_tokens_total, m.generated_tokens_total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= THROUGHPUT_WINDOW_S:
            self._samples.popleft()

    def _rates(self) -> tuple[float, float]:
        self.sample()
        (start, prompt0, generated0), (end, prompt1, generated1) = self._samples[0], self._samples[-1]
        span = end - start
        if span <= 0:
            return 0.0, 0.0
        return (prompt1 - prompt0) / span, (generated1 - generated0) / span


class _ClusterCollector(Collector):
    """Replica groups: per-replica load, the stages' length ranges, migrations and router time."""

    def __init__(self, cluster: Callable[[], object]):
        self._cluster = cluster

    def describe(self) -> Iterator:
        return iter(())

    def collect(self) -> Iterator:
        cluster = self._cluster()
        if cluster is None:
            return
        state = cluster.describe()
        running = GaugeMetricFamily("jaxinfer_replica_requests_running", "Requests running per replica",
                                    labels=("replica",))
        usage = GaugeMetricFamily("jaxinfer_replica_kv_usage_ratio", "KV pages used or demanded per replica",
                                  labels=("replica",))
        for replica in state["replicas"]:
            running.add_metric((str(replica["replica"]),), replica["running"])
            usage.add_metric((str(replica["replica"]),), replica["kv_usage"])
        yield running
        yield usage
        bounds = GaugeMetricFamily("jaxinfer_stage_context_bound_tokens",
                                   "Context-length range of each replica group (lo inclusive, hi exclusive)",
                                   labels=("stage", "bound"))
        members = GaugeMetricFamily("jaxinfer_stage_replicas", "Replicas per group", labels=("stage",))
        for group in cluster.groups():
            bounds.add_metric((group["name"], "lo"), group["lo"])
            bounds.add_metric((group["name"], "hi"), group["hi"])
            members.add_metric((group["name"],), len(group["replicas"]))
        yield bounds
        yield members
        migrations = CounterMetricFamily("jaxinfer_migrations", "Request migrations between replicas by outcome",
                                         labels=("outcome",))
        for outcome in ("completed", "refused", "gone", "failed"):
            migrations.add_metric((outcome,), state["migrations"][outcome])
        yield migrations
        yield CounterMetricFamily("jaxinfer_migration_pages_copied", "KV pages copied between replicas",
                                  value=state["migrations"]["pages_copied"])
        yield GaugeMetricFamily("jaxinfer_router_decision_seconds", "Mean router time per decision",
                                value=state["router_ms_per_decision"] / 1e3)
        router = state["router"]
        yield CounterMetricFamily("jaxinfer_router_refinements", "Stage range refinement steps",
                                  value=router.get("refinements", 0))
        yield CounterMetricFamily("jaxinfer_router_replans", "DP stage re-plans", value=router.get("replans", 0))
        failover = CounterMetricFamily("jaxinfer_failover", "Replicas lost (actor or node died) and what became "
                                       "of their requests", labels=("event",))
        for event, count in state["failover"].items():
            failover.add_metric((event,), count)
        yield failover
