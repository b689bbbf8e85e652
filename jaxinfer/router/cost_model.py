"""The profiled step time of one replica (pure Python + numpy, no jax).

A cost model is a table of measured step times on the engine's shape buckets plus the facts about
the replica that the router and the simulator need (KV pool, page size, budgets, copy bandwidth).
It is written by ``launch/profile_cost_model.py`` as JSON:

    {"hardware", "model", "dtype", "date", "page_size", "kv_bytes_per_token", "kv_capacity_tokens",
     "max_num_seqs", "max_num_batched_tokens",
     "decode":  {"batch": [B...], "kv_len": [S...], "seconds": [[per kv_len] per batch]},
     "prefill": {"tokens": [T...], "kv_len": [S...], "seconds": [[per kv_len] per tokens]},
     "copy_bytes_per_second", optional "decode_mix_padding"}

A decode entry is a step of B rows that each read S tokens of KV. The attention kernels read each
row's own pages, so a batch whose rows differ costs what a homogeneous batch at an effective length
costs: ``L = mean + mix * (longest - mean)``, where ``decode_mix_padding`` (mix, in [0, 1]) is how
much of the spread the kernel pays for (measured by ``profiling/step_profile.py``: one long row
among short ones against homogeneous batches; 0 = time follows the summed context, 1 = every row
costs the longest, the value assumed when a profile lacks the key). Lookups round the batch UP to
the grid's buckets (padded rows run through the matmuls) and interpolate linearly in the KV length
(between 0 and the first bucket from the fit's zero-context time). Past the largest bucket the time
is extrapolated from the grid's corner with a least-squares fit ``T = a + b*X + c*X*S`` (X = batch
rows or prompt tokens, S = KV length); it is never clamped. Prefill entries round both axes up.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np

_INT_KEYS = ("page_size", "kv_bytes_per_token", "kv_capacity_tokens", "max_num_seqs", "max_num_batched_tokens")
_STR_KEYS = ("hardware", "model", "dtype", "date")
_TABLES = {"decode": "batch", "prefill": "tokens"}  # table name -> its row axis


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Step times of one replica on its bucket grid. ``decode_table[i][j]``: one decode-only step of
    ``decode_batch[i]`` rows, every row padded to ``decode_kv[j]``; ``prefill_table[i][j]``: one
    prefill-only step of ``prefill_tokens[i]`` prompt tokens with KV extent ``prefill_kv[j]``."""

    hardware: str
    model: str
    dtype: str
    date: str
    page_size: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    decode_batch: tuple[int, ...]
    decode_kv: tuple[int, ...]
    decode_table: tuple[tuple[float, ...], ...]
    prefill_tokens: tuple[int, ...]
    prefill_kv: tuple[int, ...]
    prefill_table: tuple[tuple[float, ...], ...]
    copy_bytes_per_second: float
    extra: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)  # unknown JSON keys

    def __post_init__(self):
        for key in _STR_KEYS:
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"cost model: {key} must be a string, got {getattr(self, key)!r}")
        for key in _INT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cost model: {key} must be a positive integer, got {value!r}")
        bw = self.copy_bytes_per_second
        if isinstance(bw, bool) or not isinstance(bw, int | float) or not math.isfinite(bw) or bw <= 0:
            raise ValueError(f"cost model: copy_bytes_per_second must be a positive number, got {bw!r}")
        for name, rows in (("decode", self.decode_batch), ("prefill", self.prefill_tokens)):
            kv, table = getattr(self, f"{name}_kv"), getattr(self, f"{name}_table")
            _check_grid(f"{name}.{_TABLES[name]}", rows)
            _check_grid(f"{name}.kv_len", kv)
            if len(table) != len(rows) or any(len(row) != len(kv) for row in table):
                raise ValueError(f"cost model: {name}.seconds must be {len(rows)} rows of {len(kv)} times "
                                 f"(one per {_TABLES[name]} x kv_len)")
            for row in table:
                for t in row:
                    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
                        raise ValueError(f"cost model: {name}.seconds must be positive finite times, got {t!r}")
        mix = self.extra.get("decode_mix_padding", 1.0)
        if isinstance(mix, bool) or not isinstance(mix, int | float) or not 0 <= mix <= 1:
            raise ValueError(f"cost model: decode_mix_padding must be a number in [0, 1], got {mix!r}")
        if "mixed_prefill_kv" in self.extra:
            _check_grid("mixed_prefill_kv", _int_tuple("mixed_prefill_kv", self.extra["mixed_prefill_kv"]))
        host = self.extra.get("host")
        if host is not None:
            if not isinstance(host, dict) or any(
                    not isinstance(host.get(k), int | float) or not host.get(k) > 0
                    for k in ("cores", "decode_parallelism", "prefill_parallelism")):
                raise ValueError("cost model: host must be an object with positive cores, decode_parallelism and "
                                 f"prefill_parallelism, got {host!r}")

    # ---- construction and (de)serialisation -------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        if not isinstance(d, dict):
            raise ValueError(f"cost model must be a JSON object, got {type(d).__name__}")
        missing = [k for k in (*_STR_KEYS, *_INT_KEYS, "decode", "prefill", "copy_bytes_per_second") if k not in d]
        if missing:
            raise ValueError(f"cost model is missing keys: {', '.join(missing)}")
        grids = {}
        for name, row_axis in _TABLES.items():
            section = d[name]
            if not isinstance(section, dict):
                raise ValueError(f"cost model: {name} must be an object with {row_axis}, kv_len, seconds")
            lacking = [k for k in (row_axis, "kv_len", "seconds") if k not in section]
            if lacking:
                raise ValueError(f"cost model: {name} is missing keys: {', '.join(lacking)}")
            seconds = section["seconds"]
            if not isinstance(seconds, list) or not all(isinstance(row, list) for row in seconds):
                raise ValueError(f"cost model: {name}.seconds must be a list of lists")
            grids[name] = (_int_tuple(f"{name}.{row_axis}", section[row_axis]),
                           _int_tuple(f"{name}.kv_len", section["kv_len"]),
                           tuple(tuple(row) for row in seconds))
        known = {*_STR_KEYS, *_INT_KEYS, "decode", "prefill", "copy_bytes_per_second"}
        return cls(**{k: d[k] for k in (*_STR_KEYS, *_INT_KEYS)},
                   decode_batch=grids["decode"][0], decode_kv=grids["decode"][1], decode_table=grids["decode"][2],
                   prefill_tokens=grids["prefill"][0], prefill_kv=grids["prefill"][1],
                   prefill_table=grids["prefill"][2], copy_bytes_per_second=d["copy_bytes_per_second"],
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (*_STR_KEYS, *_INT_KEYS)}
        d["decode"] = {"batch": list(self.decode_batch), "kv_len": list(self.decode_kv),
                       "seconds": [list(row) for row in self.decode_table]}
        d["prefill"] = {"tokens": list(self.prefill_tokens), "kv_len": list(self.prefill_kv),
                        "seconds": [list(row) for row in self.prefill_table]}
        d["copy_bytes_per_second"] = self.copy_bytes_per_second
        d.update(self.extra)
        return d

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"cost model file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cost model {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def synthetic(cls, *, decode: tuple[float, float, float] = (6e-3, 2e-5, 5e-8),
                  prefill: tuple[float, float, float] = (6e-3, 5e-5, 1.5e-12), max_len: int = 131072,
                  kv_capacity_tokens: int = 450_000, kv_bytes_per_token: int = 131072, page_size: int = 16,
                  max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                  copy_bytes_per_second: float = 25e9, mix_padding: float = 0.1) -> CostModel:
        """An analytic model: decode ``a + b*B + c*B*S``, prefill ``a + b*T + c*T*S`` evaluated on
        power-of-two grids (so the fit recovers the coefficients exactly). The defaults are roughly an
        8B model in bf16 on one H100: 6 ms of weight reads per step, 128 KiB of KV per token read at
        ~2.6 TB/s, ~450K tokens of KV pool, and a 25 GB/s link between replicas. ``mix_padding``
        (``decode_mix_padding``): 0.1 puts the attention time of a length-mixed batch against a
        homogeneous one of the same summed context at 1.2x (one 4K row among fifteen 1K rows) to 2.0x
        (one 8K row among thirty-one 512-token rows), the 1.1-2.1x the CascadeInfer paper measured for
        GPU decode kernels; not measured here (no GPU was lent)."""
        if any(not x >= 0 for x in (*decode, *prefill)) or decode[0] <= 0 or prefill[0] <= 0:
            raise ValueError(f"synthetic cost coefficients must be >= 0 with a > 0, got {decode=} {prefill=}")
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        batch = _powers_of_two(1, max_num_seqs)
        tokens = _powers_of_two(16, max_num_batched_tokens)
        kv = _powers_of_two(256, max_len)

        def table(coef, rows):
            a, b, c = coef
            return tuple(tuple(a + b * x + c * x * s for s in kv) for x in rows)

        return cls(hardware="synthetic", model="synthetic", dtype="bfloat16", date="", page_size=page_size,
                   kv_bytes_per_token=kv_bytes_per_token, kv_capacity_tokens=kv_capacity_tokens,
                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                   decode_batch=batch, decode_kv=kv, decode_table=table(decode, batch),
                   prefill_tokens=tokens, prefill_kv=kv, prefill_table=table(prefill, tokens),
                   copy_bytes_per_second=float(copy_bytes_per_second),
                   extra={"synthetic": True, "decode_mix_padding": float(mix_padding)})

    def with_capacity(self, kv_capacity_tokens: int) -> CostModel:
        """The same step times with another KV pool size (cluster-size and long-context studies)."""
        return dataclasses.replace(self, kv_capacity_tokens=kv_capacity_tokens)

    # ---- queries ----------------------------------------------------------------------------------

    @property
    def kv_capacity_pages(self) -> int:
        return self.kv_capacity_tokens // self.page_size

    @property
    def mix_padding(self) -> float:
        """``decode_mix_padding``: the share of a decode batch's length spread its step pays for."""
        return float(self.extra.get("decode_mix_padding", 1.0))

    def effective_context(self, max_context, mean_context=None):
        """The homogeneous row length a decode batch costs like (scalars or numpy arrays)."""
        if mean_context is None:
            return max_context
        return mean_context + self.mix_padding * (max_context - mean_context)

    def decode_seconds(self, batch: int, max_context: int, mean_context: float | None = None) -> float:
        """One decode-only step of ``batch`` rows, the longest at ``max_context`` and on average at
        ``mean_context`` (None: every row at max_context); 0 for an empty batch."""
        if batch <= 0:
            return 0.0
        s = max(self.effective_context(max_context, mean_context), 0.0)
        rows, kv, table = self.decode_batch, self.decode_kv, self.decode_table
        a, b, c = self.decode_fit()
        i = bisect.bisect_left(rows, batch)
        x = batch if i == len(rows) else rows[i]
        i = min(i, len(rows) - 1)
        row = table[i]
        j = bisect.bisect_left(kv, s)
        if j == len(kv):
            t = row[-1] + c * rows[i] * (s - kv[-1])
        elif j == 0:
            floor = min(a + b * rows[i], row[0])
            t = floor + (row[0] - floor) * s / kv[0]
        else:
            t = row[j - 1] + (row[j] - row[j - 1]) * (s - kv[j - 1]) / (kv[j] - kv[j - 1])
        return float(t + (b + c * s) * (x - rows[i]))

    def decode_seconds_array(self, batch, max_context, mean_context=None) -> np.ndarray:
        """``decode_seconds`` over numpy arrays (broadcast together)."""
        context = self.effective_context(np.asarray(max_context, float),
                                         None if mean_context is None else np.asarray(mean_context, float))
        x, s = np.broadcast_arrays(np.asarray(batch), np.maximum(context, 0.0))
        rows, kv = np.asarray(self.decode_batch), np.asarray(self.decode_kv, float)
        table = np.asarray(self.decode_table, float)
        a, b, c = self.decode_fit()
        i = np.minimum(np.searchsorted(rows, x, side="left"), len(rows) - 1)
        x_at = np.where(x <= rows[-1], rows[i], x)
        floor = np.minimum(a + b * rows, table[:, 0])
        grid = np.concatenate([floor[:, None], table], axis=1)  # column 0: zero context
        points = np.concatenate([[0.0], kv])
        j = np.clip(np.searchsorted(points, s, side="left"), 1, len(points) - 1)
        lo, hi = grid[i, j - 1], grid[i, j]
        t = lo + (hi - lo) * (np.minimum(s, kv[-1]) - points[j - 1]) / (points[j] - points[j - 1])
        t = t + c * rows[i] * np.maximum(s - kv[-1], 0.0) + (b + c * s) * (x_at - rows[i])
        return np.where(x <= 0, 0.0, t)

    def prefill_seconds(self, tokens: int, kv_len: int) -> float:
        """One prefill-only step of ``tokens`` prompt tokens whose KV extent is ``kv_len`` (>= tokens)."""
        if tokens <= 0:
            return 0.0
        return _lookup(self.prefill_tokens, self.prefill_kv, self.prefill_table, self.prefill_fit(), tokens,
                       max(kv_len, tokens))

    def step_seconds(self, num_decode: int, max_decode_context: int, prefill_tokens: int, prefill_kv: int,
                     mean_decode_context: float | None = None) -> float:
        """A mixed step, taken as its decode part plus its prefill part plus the host overhead (0 for
        an empty step)."""
        parts = self.step_parts(num_decode, max_decode_context, prefill_tokens, prefill_kv, mean_decode_context)
        return sum(parts) + self.step_overhead if num_decode or prefill_tokens else 0.0

    def step_parts(self, num_decode: int, max_decode_context: int, prefill_tokens: int, prefill_kv: int,
                   mean_decode_context: float | None = None) -> tuple[float, float]:
        """(decode part, prefill part) of a step. With ``mixed_prefill_kv`` in the profile (the engine's
        mixed-step KV buckets), the prompt part of a step that also decodes is padded as the engine
        pads it: to the largest prompt bucket and to those KV buckets."""
        mixed = self.extra.get("mixed_prefill_kv")
        if num_decode and prefill_tokens and mixed:
            prefill_tokens = max(prefill_tokens, self.prefill_tokens[-1])
            prefill_kv = next((b for b in mixed if b >= prefill_kv), prefill_kv)
        if not num_decode and not prefill_tokens:
            return 0.0, 0.0
        return (self.decode_seconds(num_decode, max_decode_context, mean_decode_context),
                self.prefill_seconds(prefill_tokens, prefill_kv))

    @property
    def step_overhead(self) -> float:
        """Host seconds around every step beyond the profiled compiled step (profile key
        ``step_overhead_seconds``, calibrated on a real run; 0 without it)."""
        return float(self.extra.get("step_overhead_seconds", 0.0))

    def host_slowdown(self, busy: int) -> tuple[float, float]:
        """(decode, prefill) stretch of a step while ``busy`` replicas (this one included) step at once
        on a host whose cores they share (profile key ``host``: a step alone keeps ``*_parallelism``
        cores busy, and the busy steps split the ``cores`` evenly); (1, 1) without that key."""
        host = self.extra.get("host")
        if host is None or busy <= 1:
            return 1.0, 1.0
        return tuple(max(1.0, host[f"{part}_parallelism"] * busy / host["cores"]) for part in ("decode", "prefill"))

    def transfer_seconds(self, tokens: int, bytes_per_second: float | None = None) -> float:
        """Copying the KV of ``tokens`` tokens to another replica (over a link of ``bytes_per_second``;
        default the profile's copy bandwidth)."""
        return max(tokens, 0) * self.kv_bytes_per_token / (bytes_per_second or self.copy_bytes_per_second)

    def recompute_seconds(self, tokens: int) -> float:
        """Re-prefilling ``tokens`` tokens alone, in chunks of max_num_batched_tokens."""
        chunk, total, done = self.max_num_batched_tokens, 0.0, 0
        while done < tokens:
            n = min(chunk, tokens - done)
            done += n
            total += self.prefill_seconds(n, done)
        return total

    @functools.cached_property
    def _fits(self) -> dict:
        return {"decode": _fit(self.decode_batch, self.decode_kv, self.decode_table),
                "prefill": _fit(self.prefill_tokens, self.prefill_kv, self.prefill_table)}

    def decode_fit(self) -> tuple[float, float, float]:
        """Least-squares ``(a, b, c)`` with decode step ``T ~ a + b*B + c*B*S`` over the grid
        (b, c >= 0: a negative slope from noise is refit without that term)."""
        return self._fits["decode"]

    def prefill_fit(self) -> tuple[float, float, float]:
        """Least-squares ``(a, b, c)`` with prefill step ``T ~ a + b*T + c*T*S`` over the grid."""
        return self._fits["prefill"]


def _check_grid(name: str, grid: tuple[int, ...]) -> None:
    if not grid:
        raise ValueError(f"cost model: {name} is empty")
    if grid[0] < 1 or any(b <= a for a, b in zip(grid, grid[1:], strict=False)):
        raise ValueError(f"cost model: {name} must be strictly increasing positive integers, got {list(grid)}")


def _int_tuple(name: str, values) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"cost model: {name} must be a list of integers, got {values!r}")
    return tuple(values)


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return tuple(out)


def _fit(rows: tuple[int, ...], kv: tuple[int, ...], table) -> tuple[float, float, float]:
    x, s = np.meshgrid(np.asarray(rows, float), np.asarray(kv, float), indexing="ij")
    t = np.asarray(table, float).ravel()
    columns = {"a": np.ones(t.size), "b": x.ravel(), "c": (x * s).ravel()}
    keep = ["a", "b", "c"]
    while True:
        coef, *_ = np.linalg.lstsq(np.stack([columns[k] for k in keep], axis=1), t, rcond=None)
        values = dict(zip(keep, coef.tolist(), strict=True))
        negative = [k for k in keep[1:] if values[k] < 0]
        if not negative:
            return values.get("a", 0.0), values.get("b", 0.0), values.get("c", 0.0)
        keep.remove(min(negative, key=values.get))


def _lookup(rows, kv, table, fit, x: int, s: int) -> float:
    """Table value at the buckets (x, s) round up to; past the grid, the corner value plus the fitted
    model's increase from the corner to the exact (x, s)."""
    i, j = bisect.bisect_left(rows, x), bisect.bisect_left(kv, s)
    if i < len(rows) and j < len(kv):
        return float(table[i][j])
    i, j = min(i, len(rows) - 1), min(j, len(kv) - 1)
    x_at = rows[i] if x <= rows[-1] else x
    s_at = kv[j] if s <= kv[-1] else s
    _, b, c = fit
    return float(table[i][j]) + b * (x_at - rows[i]) + c * (x_at * s_at - rows[i] * kv[j])
