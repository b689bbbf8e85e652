"""Bucket sizes (DESIGN.md principle 2: static shapes by buckets): the one rule that pads a count to
the smallest declared bucket that holds it, and the geometric ladders the configs declare. Host
only, stdlib only: the configs, the batch builder and the speculative decoder all use it."""

from __future__ import annotations

from collections.abc import Sequence


def bucket(value: int, buckets: Sequence[int]) -> int:
    """The smallest of the ascending ``buckets`` that holds ``value``."""
    for size in buckets:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def geometric(start: int, ratio: int, stop: int) -> tuple[int, ...]:
    """start, start * ratio, ... while below stop, then stop itself."""
    values = []
    while start < stop:
        values.append(start)
        start *= ratio
    return (*values, stop)
