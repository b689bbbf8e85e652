"""The QoE-optimal stage partition: which contiguous length ranges the replicas serve, and how many
replicas each range gets (CascadeInfer §3.2; pure Python + numpy, no jax).

Candidate boundaries ``g_0 = 0 < g_1 < ... < g_K = max_len`` cut lengths into K buckets. A stage is a
run of buckets ``[g_j, g_k)`` served by ``m`` replicas; its cost ``Q(j, k, m)`` comes from a
steady-state model of one replica of the stage:

- per-replica decode demand ``x = W/m`` (token-steps/s) and prefill work ``u_p`` (seconds/s,
  from the prefill fit, one step overhead per chunk);
- the steady running batch B is the smallest that keeps up: ``B / T(B, U) >= x / (1 - u_p)`` with
  T the profiled decode step on the engine's buckets and U the stage's upper length (the engine
  pads every row to the batch's longest context); TPOT is ``T(B, U) / (1 - u_p)``;
- infeasible (``inf``) when no B within ``min(max_num_seqs, capacity / U)`` keeps up, or the
  utilisation ``u_p + x / peak throughput`` reaches ``max_utilisation``;
- TTFT: the prompt's prefill (chunked, one mixed step per chunk) with an M/D/1-style wait;
- requests crossing the stage's upper boundary pay one migration.

The QoE function turns these into a cost; the default is the stage's share of the mean end-to-end
latency, ``(W*tpot + arrivals*ttft + crossing*migration) / total arrivals``, which adds up exactly
over stages. ``F[k][n] = min_{j<k, 1<=m<=n} F[j][n-m] + Q(j, k, m)`` with every replica used.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np

from jaxinfer.router.cost_model import CostModel


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Stage s serves lengths ``[boundaries[s], boundaries[s+1])`` (the last one also everything
    longer) with ``replica_counts[s]`` replicas, numbered consecutively from stage 0."""

    boundaries: tuple[int, ...]
    replica_counts: tuple[int, ...]
    cost: float = 0.0
    load_scale: float = 1.0  # < 1: the demand was infeasible and the plan fits this fraction of it

    def __post_init__(self):
        b, counts = tuple(self.boundaries), tuple(self.replica_counts)
        if not counts:
            raise ValueError("a stage plan needs at least one stage")
        if len(b) != len(counts) + 1:
            raise ValueError(f"a plan of {len(counts)} stages needs {len(counts) + 1} boundaries, got {len(b)}")
        if b[0] != 0 or any(hi <= lo for lo, hi in zip(b, b[1:], strict=False)):
            raise ValueError(f"stage boundaries must start at 0 and strictly increase, got {list(b)}")
        if any(not isinstance(m, int) or m < 1 for m in counts):
            raise ValueError(f"every stage needs at least one replica, got counts {list(counts)}")
        object.__setattr__(self, "boundaries", tuple(int(x) for x in b))
        object.__setattr__(self, "replica_counts", counts)

    @classmethod
    def single(cls, num_replicas: int, max_len: int) -> StagePlan:
        return cls((0, max_len), (num_replicas,))

    @property
    def num_stages(self) -> int:
        return len(self.replica_counts)

    @property
    def num_replicas(self) -> int:
        return sum(self.replica_counts)

    @property
    def max_len(self) -> int:
        return self.boundaries[-1]

    def stage_of(self, length: int) -> int:
        """The stage whose range holds ``length`` (past the last boundary: the last stage)."""
        lo, hi = 0, self.num_stages - 1
        while lo < hi:  # first stage whose upper boundary is above length
            mid = (lo + hi) // 2
            if self.boundaries[mid + 1] > length:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def replicas_of(self, stage: int) -> range:
        start = sum(self.replica_counts[:stage])
        return range(start, start + self.replica_counts[stage])

    def stage_of_replica(self, replica: int) -> int:
        for s in range(self.num_stages):
            if replica in self.replicas_of(s):
                return s
        raise ValueError(f"replica {replica} is not in a plan of {self.num_replicas} replicas")


@dataclasses.dataclass(frozen=True, eq=False)
class Demand:
    """Per-bucket load rates (bucket k = lengths [g_k, g_k+1)); arrays of shape [K]."""

    decode: np.ndarray  # decode token-steps/s with the context in bucket k
    prefill: np.ndarray  # prompt tokens/s of arrivals whose prompt is in bucket k
    arrivals: np.ndarray  # requests/s whose prompt is in bucket k
    crossing: np.ndarray  # requests/s whose context grows past the bucket's upper boundary

    def __post_init__(self):
        shapes = {a.shape for a in (self.decode, self.prefill, self.arrivals, self.crossing)}
        if len(shapes) != 1 or len(shapes.pop()) != 1:
            raise ValueError("demand arrays must all be 1-D of the same length (one value per bucket)")

    @property
    def num_buckets(self) -> int:
        return len(self.decode)

    def scaled(self, factor: float) -> Demand:
        return Demand(self.decode * factor, self.prefill * factor, self.arrivals * factor, self.crossing * factor)

    @classmethod
    def from_rates(cls, decode, prefill, boundaries) -> Demand:
        """Demand from w and pf alone: arrivals are estimated as pf / bucket midpoint and the crossing
        rate of a boundary as the decode density just below it (w / bucket width: a request decoding
        through a length executes one step at it)."""
        g = np.asarray(boundaries, float)
        w, pf = np.asarray(decode, float), np.asarray(prefill, float)
        if len(g) != len(w) + 1 or len(pf) != len(w):
            raise ValueError(f"{len(w)} decode and {len(pf)} prefill rates need {len(w) + 1} boundaries, got {len(g)}")
        crossing = w / np.diff(g)
        crossing[-1] = 0.0
        return cls(w, pf, pf / np.maximum((g[:-1] + g[1:]) / 2, 1.0), crossing)


def default_grid(max_len: int, num_buckets: int = 24, min_len: int = 64, page_size: int = 16) -> tuple[int, ...]:
    """Candidate boundaries 0, then geometric from min_len up to max_len, on page multiples."""
    if max_len <= min_len or num_buckets < 2:
        raise ValueError(f"need max_len > min_len and num_buckets >= 2, got {max_len=} {min_len=} {num_buckets=}")
    points = np.geomspace(min_len, max_len, num_buckets)
    inner = sorted({int(round(p / page_size)) * page_size for p in points[:-1]} - {0})
    return (0, *[p for p in inner if p < max_len], max_len)


def demand_from_requests(requests: Iterable[tuple[int, int]], boundaries, window_seconds: float,
                         weights=None) -> Demand:
    """Demand rates from (prompt_len, output_len) samples observed over ``window_seconds`` (each
    counting ``weights[i]`` times, default once): a request decodes at context lengths
    [prompt, prompt + output); lengths past the last boundary count in the last bucket."""
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be positive, got {window_seconds}")
    g = np.asarray(boundaries, float)
    _check_boundaries(g)
    pairs = np.asarray(list(requests), float).reshape(-1, 2)
    wt = np.ones((len(pairs), 1)) if weights is None else np.asarray(weights, float).reshape(-1, 1)
    if len(wt) != len(pairs):
        raise ValueError(f"{len(wt)} weights for {len(pairs)} requests")
    p, end = pairs[:, 0:1], pairs[:, 0:1] + np.maximum(pairs[:, 1:2], 0)
    lo, hi = g[:-1].copy(), g[1:].copy()
    hi[-1] = np.inf
    decode = (wt * np.clip(np.minimum(end, hi) - np.maximum(p, lo), 0, None)).sum(axis=0)
    in_bucket = wt * ((p >= lo) & (p < hi))
    prefill = (in_bucket * p).sum(axis=0)
    arrivals = in_bucket.sum(axis=0)
    crossing = (wt * ((p < hi) & (end > hi))).sum(axis=0)
    return Demand(decode / window_seconds, prefill / window_seconds, arrivals / window_seconds,
                  crossing / window_seconds)


@dataclasses.dataclass(frozen=True, eq=False)
class StageEstimate:
    """The steady-state model of every candidate stage, arrays broadcast over (j, k, m)."""

    decode_rate: np.ndarray  # W: decode token-steps/s of the stage
    arrival_rate: np.ndarray  # requests/s entering the stage
    crossing_rate: np.ndarray  # requests/s leaving it downstream
    tpot: np.ndarray  # seconds per output token
    ttft: np.ndarray  # seconds to the first token
    migration_seconds: np.ndarray  # added latency of one crossing
    batch: np.ndarray  # steady-state running requests per replica
    utilisation: np.ndarray
    total_arrival_rate: float


QoE = Callable[[StageEstimate], np.ndarray]


def mean_e2e_qoe(est: StageEstimate) -> np.ndarray:
    """The stage's share of the mean end-to-end latency (seconds); lower is better."""
    latency = est.decode_rate * est.tpot + est.arrival_rate * est.ttft + est.crossing_rate * est.migration_seconds
    return latency / max(est.total_arrival_rate, 1e-12)


def weighted_qoe(tpot_weight: float = 1.0, ttft_weight: float = 1.0) -> QoE:
    """A QoE that weighs the token-time and first-token parts of the latency differently."""

    def qoe(est: StageEstimate) -> np.ndarray:
        latency = (tpot_weight * est.decode_rate * est.tpot + ttft_weight * est.arrival_rate * est.ttft
                   + est.crossing_rate * est.migration_seconds)
        return latency / max(est.total_arrival_rate, 1e-12)

    return qoe


def stage_costs(demand: Demand, boundaries, num_replicas: int, cost_model: CostModel, *,
                capacity_tokens: int | None = None, max_utilisation: float = 0.9,
                migration_seconds: Callable[[int], float] | None = None, qoe: QoE = mean_e2e_qoe) -> np.ndarray:
    """``Q[j, k, m]`` for stage [g_j, g_k) on m replicas; shape [K+1, K+1, N+1], inf where j >= k,
    m = 0 or the stage is infeasible."""
    g = np.asarray(boundaries, float)
    _check_boundaries(g)
    num_buckets = len(g) - 1
    if demand.num_buckets != num_buckets:
        raise ValueError(f"demand has {demand.num_buckets} buckets but the boundaries make {num_buckets}")
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be positive, got {num_replicas}")
    capacity = cost_model.kv_capacity_tokens if capacity_tokens is None else capacity_tokens
    migrate = migration_seconds or (lambda n: min(cost_model.transfer_seconds(n), cost_model.recompute_seconds(n)))

    def span(values):  # [j, k] -> sum over buckets j..k-1
        c = np.concatenate([[0.0], np.cumsum(values)])
        return (c[None, :] - c[:, None])[:, :, None]

    w, pf, arr = span(demand.decode), span(demand.prefill), span(demand.arrivals)
    # The stage's effective upper length: the top of its highest bucket with any demand.
    busy = np.flatnonzero((demand.decode > 0) | (demand.arrivals > 0))
    last_busy = np.full(num_buckets + 1, -1)
    for i in busy:
        last_busy[i + 1:] = i
    j_idx = np.arange(num_buckets + 1)[:, None]
    top = np.minimum(np.where(last_busy[None, :] >= j_idx, last_busy[None, :] + 1, j_idx + 1), num_buckets)
    crossing = np.concatenate([[0.0], demand.crossing[:-1], [0.0]])[None, :, None]
    mig = np.array([0.0] + [migrate(int(x)) for x in g[1:-1]] + [0.0])[None, :, None]

    m = np.arange(num_replicas + 1, dtype=float)[None, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        x, lam = w / m, arr / m
        pa, pb, pc = cost_model.prefill_fit()
        chunk = cost_model.max_num_batched_tokens
        mean_prompt = np.where(arr > 0, pf / np.where(arr > 0, arr, 1), 0.0)
        chunks = np.ceil(mean_prompt / chunk)
        prefill_work = chunks * pa + pb * mean_prompt + pc * mean_prompt * (mean_prompt + chunk) / 2  # per prompt
        u_p = lam * prefill_work
        need = x / (1 - u_p)  # decode tokens/s a replica must deliver in the time prefill leaves
        batch, step, peak = _steady_batch(need, top, g, cost_model, capacity, _mean_length(demand, g))
        rho = u_p + x / peak
        tpot = step / (1 - u_p)
        service = chunks * tpot + prefill_work
        ttft = service * (1 + rho / (2 * (1 - rho)))
        est = StageEstimate(w, arr, crossing, tpot, ttft, mig, batch, rho, float(demand.arrivals.sum()))
        q = np.asarray(qoe(est), float)
    q = np.broadcast_to(q, rho.shape).copy()
    bad = (u_p >= max_utilisation) | (rho >= max_utilisation) | ~np.isfinite(q)
    bad |= (j_idx[:, :, None] >= np.arange(num_buckets + 1)[None, :, None]) | (m == 0)
    q[bad] = np.inf
    return q


def _mean_length(demand: Demand, g: np.ndarray) -> np.ndarray:
    """[j, k]: the decode-demand-weighted mean context of stage [g_j, g_k) (bucket midpoints; the
    stage's midpoint where it has no decode demand)."""
    mid = (g[:-1] + g[1:]) / 2
    weight = np.concatenate([[0.0], np.cumsum(demand.decode)])
    moment = np.concatenate([[0.0], np.cumsum(demand.decode * mid)])
    total = weight[None, :] - weight[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (moment[None, :] - moment[:, None]) / total
    return np.where(total > 0, mean, (g[:, None] + g[None, :]) / 2)


def _steady_batch(need: np.ndarray, top: np.ndarray, g: np.ndarray, cost_model: CostModel, capacity: int,
                  mean_len: np.ndarray):
    """Per stage: the smallest running batch B whose decode throughput ``B / T(B, U)`` (the profiled
    step time on the engine's buckets, every row padded to the stage's upper length U = g[top])
    reaches ``need``, the step time T at it, and the peak throughput within the memory bound
    ``B <= min(max_num_seqs, capacity / mean length)`` (the pool holds the stage's typical requests,
    not B copies of its longest). Where ``need`` exceeds the peak: B = inf."""
    rows = np.arange(1, cost_model.max_num_seqs + 1)
    step = cost_model.decode_seconds_array(rows[:, None], g[None, 1:])  # [B, upper index - 1]
    batch = np.full(need.shape, np.inf)
    seconds = np.full(need.shape, np.inf)
    peak = np.full(need.shape, np.nan)
    tops = np.broadcast_to(top[:, :, None], need.shape)
    limits = np.broadcast_to(np.minimum(cost_model.max_num_seqs, capacity // np.maximum(mean_len, 1)).astype(int)
                             [:, :, None], need.shape)
    for u in np.unique(top):
        if u < 1:
            continue
        mask = tops == u
        limit = limits[mask]
        best = np.maximum.accumulate(rows / step[:, u - 1])  # best throughput with <= B rows
        idx = np.searchsorted(best, need[mask], side="left")
        ok = idx < limit
        b = np.full(idx.shape, np.inf)
        t = np.full(idx.shape, np.inf)
        b[ok] = rows[idx[ok]]
        t[ok] = step[idx[ok], u - 1]
        batch[mask], seconds[mask] = b, t
        peak[mask] = np.where(limit >= 1, best[np.clip(limit - 1, 0, len(best) - 1)], 0.0)
    return batch, seconds, peak


def partition(demand: Demand, boundaries, num_replicas: int, cost_model: CostModel, *, stage_penalty: float = 0.0,
              **kw) -> StagePlan:
    """The plan minimising the summed stage cost with every replica used (see the module doc); with
    ``stage_penalty``, every stage costs that much more (plans with fewer stages). If no plan is
    feasible the demand is halved until one is, and the plan records that ``load_scale``."""
    scale = 1.0
    for _ in range(40):
        q = stage_costs(demand.scaled(scale) if scale != 1.0 else demand, boundaries, num_replicas, cost_model, **kw)
        plan = _solve(q + stage_penalty, boundaries, num_replicas, scale)
        if plan is not None:
            return plan
        scale /= 2
    return StagePlan.single(num_replicas, int(boundaries[-1]))


def _solve(q: np.ndarray, boundaries, num_replicas: int, scale: float) -> StagePlan | None:
    """``F[k][n] = min_{j<k, 1<=m<=n} F[j][n-m] + Q[j, k, m]``, vectorised over (j, n, m)."""
    num_buckets, n_max = q.shape[0] - 1, num_replicas
    f = np.full((num_buckets + 1, n_max + 1), np.inf)
    f[0, 0] = 0.0
    choice = np.zeros((num_buckets + 1, n_max + 1, 2), dtype=np.int64)
    n = np.arange(n_max + 1)[:, None]
    m = np.arange(1, n_max + 1)[None, :]
    rest = n - m  # [n, m] replicas left for the stages before
    valid = rest >= 0
    rest = np.where(valid, rest, 0)
    for k in range(1, num_buckets + 1):
        cand = f[:k][:, rest] + q[:k, k, 1:][:, None, :]  # [j, n, m]
        cand[:, ~valid] = np.inf
        flat = cand.transpose(1, 0, 2).reshape(n_max + 1, -1)
        best = flat.argmin(axis=1)
        f[k] = flat[np.arange(n_max + 1), best]
        choice[k, :, 0], choice[k, :, 1] = np.divmod(best, n_max)
    if not np.isfinite(f[num_buckets, n_max]):
        return None
    cuts, counts, k, left = [], [], num_buckets, n_max
    while k > 0:
        j, m_index = choice[k, left]
        counts.append(int(m_index) + 1)
        cuts.append(k)
        k, left = int(j), left - (int(m_index) + 1)
    g = [int(x) for x in boundaries]
    return StagePlan((0, *[g[c] for c in reversed(cuts)]), tuple(reversed(counts)), float(f[num_buckets, n_max]),
                     scale)


def brute_force_partition(demand: Demand, boundaries, num_replicas: int, cost_model: CostModel, **kw) -> StagePlan:
    """Every way to cut the buckets into stages and share the replicas among them (for tests: small K, N)."""
    q = stage_costs(demand, boundaries, num_replicas, cost_model, **kw)
    num_buckets = len(boundaries) - 1
    best_cost, best = math.inf, None
    for num_cuts in range(0, min(num_buckets, num_replicas)):
        for cuts in itertools.combinations(range(1, num_buckets), num_cuts):
            edges = (0, *cuts, num_buckets)
            for bars in itertools.combinations(range(1, num_replicas), num_cuts):
                counts = np.diff((0, *bars, num_replicas))
                cost = sum(q[edges[s], edges[s + 1], counts[s]] for s in range(len(counts)))
                if cost < best_cost:
                    best_cost, best = cost, (edges, counts)
    if best is None:
        raise ValueError("no feasible partition")
    edges, counts = best
    g = [int(x) for x in boundaries]
    return StagePlan(tuple(g[e] for e in edges), tuple(int(c) for c in counts), float(best_cost))


def _check_boundaries(g: np.ndarray) -> None:
    if g.ndim != 1 or len(g) < 2 or g[0] != 0 or np.any(np.diff(g) <= 0):
        raise ValueError(f"boundaries must start at 0 and strictly increase, got {g.tolist()}")
