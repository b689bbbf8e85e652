"""The compile plan: every (step, shape) a model runner will ever run, listed before the first request.

Warm-up compiles exactly the plan's entries (``ModelRunner.warm_up``) and no request compiles
anything afterwards; the compile-budget test checks that a warm engine's compile count equals
``len(plan)`` and stays put through a mixed workload. Entries, in the order warm-up compiles them:

- ``SamplerRows``: the sampler of steps with that many sampling rows (decode rows plus prompt chunks);
- ``StepShape``: a plain forward step of that bucketed shape, or a burst of decode steps where
  decode-only steps run as bursts;
- a ``DeviceProgram`` handed down from spec/ (a speculative round's verify, draft or fused round);
- ``PageCopy``: a migration's export or import of a page bucket, and ``SLOT_IMPORT`` (an arriving
  request's penalty history), for replicas that take part in migrations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from jaxinfer.engine.batch import StepShape


@dataclasses.dataclass(frozen=True)
class SamplerRows:
    rows: int


@dataclasses.dataclass(frozen=True)
class PageCopy:
    kind: str  # 'export' (gather the pages' KV) or 'import' (scatter it)
    pages: int  # the page bucket


@dataclasses.dataclass(frozen=True)
class SlotImport:
    pass


SLOT_IMPORT = SlotImport()


@dataclasses.dataclass(frozen=True)
class CompilePlan:
    samplers: tuple[int, ...] = ()  # sampling row counts
    steps: tuple[StepShape, ...] = ()
    programs: tuple[Any, ...] = ()  # DeviceProgram objects (jaxinfer.engine.model_runner)
    page_buckets: tuple[int, ...] = ()  # migration transfers (export and import each) and the slot import

    def entries(self) -> list:
        copies = [PageCopy(kind, size) for size in self.page_buckets for kind in ("export", "import")]
        return [*(SamplerRows(rows) for rows in self.samplers), *self.steps, *self.programs, *copies,
                *([SLOT_IMPORT] if self.page_buckets else [])]

    def __iter__(self) -> Iterator:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.entries())

    def describe(self) -> dict[str, int]:
        """How many executables of each kind the plan compiles."""
        return {"samplers": len(self.samplers), "steps": len(self.steps), "programs": len(self.programs),
                "migration": 2 * len(self.page_buckets) + bool(self.page_buckets)}
