"""Per-request sampling parameters, validated on the host before anything is scheduled."""

from __future__ import annotations

import dataclasses
import math
import secrets

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TEMPERATURE = 100.0  # float32-safe; far beyond any useful value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples and when it stops. Every value becomes a per-row device array, so no
    value ever causes a recompilation."""

    temperature: float = dataclasses.field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus mass in (0, 1]"})
    top_k: int = dataclasses.field(default=0, metadata={"help": "0 = no limit"})
    min_p: float = dataclasses.field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability"})
    repetition_penalty: float = dataclasses.field(default=1.0, metadata={"help": "> 1 discourages seen tokens"})
    presence_penalty: float = dataclasses.field(default=0.0, metadata={"help": "in [-2, 2], per generated token"})
    frequency_penalty: float = dataclasses.field(default=0.0, metadata={"help": "in [-2, 2], per occurrence"})
    seed: int | None = dataclasses.field(default=None, metadata={
        "help": "sampling seed: the same seed gives the same tokens (default: a fresh random seed per request)",
        "type": int})
    max_tokens: int = dataclasses.field(default=256, metadata={"help": "new tokens at most"})
    ignore_eos: bool = dataclasses.field(default=False, metadata={"help": "keep going past end-of-sequence"})
    stop: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "stop string (repeatable); the text ends before it", "item_type": str})
    stop_token_ids: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "extra stop token id (repeatable)", "item_type": int})
    logprobs: int | None = dataclasses.field(
        default=None, metadata={"help": "return the sampled token's logprob and this many top ones", "type": int})
    sparse_prefill: bool = dataclasses.field(
        default=True, metadata={"help": "allow UniSparse block-sparse prefill of a long prompt (False: dense)"})

    def __post_init__(self) -> None:
        if not _number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _integer(self.top_k) or not 0 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be an integer in [0, 2**31), got {self.top_k!r}")
        if not _number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _integer(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("ignore_eos", "sparse_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))
        if self.logprobs is not None and (not _integer(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")

    def seeded(self) -> SamplingParams:
        """These parameters with a seed: their own, or a fresh random one (drawn once per request, so
        that preemption, migration and speculation replay the same draws)."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbits(63))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in stop):
        raise ValueError(f"stop strings must be 1 to {MAX_STOP_STRING_CHARS} characters long")
    return tuple(stop)


def _stop_token_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)) or not all(_integer(i) and i >= 0 for i in ids):
        raise ValueError("stop_token_ids must be a list of integers >= 0")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(ids)}")
    return tuple(ids)
