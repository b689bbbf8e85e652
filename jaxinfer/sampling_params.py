"""Per-request sampling parameters, validated on the host before anything is scheduled."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = dataclasses.field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus mass in (0, 1]"})
    top_k: int = dataclasses.field(default=0, metadata={"help": "0 = no limit"})
    seed: int = dataclasses.field(default=0, metadata={"help": "sampling seed (reproducible per request)"})
    max_tokens: int = dataclasses.field(default=256, metadata={"help": "new tokens at most"})
    ignore_eos: bool = dataclasses.field(default=False, metadata={"help": "keep going past end-of-sequence"})

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
