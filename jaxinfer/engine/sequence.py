"""One request's host-side state while the engine works on it (no jax)."""

from __future__ import annotations

import enum
import time

from jaxinfer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or the server


class Sequence:
    """Prompt plus generated tokens, the KV pages that hold them and the bookkeeping around them.

    ``num_computed`` tokens have their KV in ``pages``; the rest (the prompt tail, or after a
    preemption everything) still has to go through the model. ``slot`` is the row of the runner's
    per-request sampling state (penalty counts) while the sequence runs.
    """

    __slots__ = ("request_id", "prompt_ids", "output_ids", "params", "status", "finish_reason", "pages",
                 "num_computed", "num_cached", "slot", "page_hashes", "arrival_time", "first_scheduled_time",
                 "first_token_time", "finish_time", "num_preemptions", "logprobs", "cache_salt", "resumed_at")

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.pages: list[int] = []
        self.num_computed = 0
        self.num_cached = 0  # prompt tokens served from the prefix cache (first admission)
        self.slot = -1
        self.page_hashes: list[bytes] = []  # chained hashes of the leading full pages
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self.logprobs: list[tuple[float, list[int], list[float]]] = []
        # starts the prefix-cache hash chain: KV computed another way (sparse prefill) is never shared
        self.cache_salt: bytes | None = None
        self.resumed_at = 0  # num_computed at the last admission (the draft head has no feature before it)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)}, "
                f"computed={self.num_computed}, {self.status.value})")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, index: int) -> int:
        prompt_len = len(self.prompt_ids)
        return self.prompt_ids[index] if index < prompt_len else self.output_ids[index - prompt_len]

    def tokens(self, start: int, stop: int) -> list[int]:
        return (self.prompt_ids + self.output_ids)[start:stop] if stop > len(self.prompt_ids) \
            else self.prompt_ids[start:stop]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token lacks KV: the next step is a one-token decode."""
        return self.num_uncomputed == 1 and bool(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
