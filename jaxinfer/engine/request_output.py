"""What a request gives back: token ids, text, finish reason, logprobs and timings; and the host
side text stream that detokenizes incrementally and applies stop strings (never emitting text past a
stop string, which means holding back a stop string's length minus one character)."""

from __future__ import annotations

import dataclasses

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.engine.sequence import Sequence
from jaxinfer.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the most likely tokens and their logprobs (params.logprobs of them)


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_cached_tokens: int
    num_preemptions: int

    @property
    def queue_seconds(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_seconds(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def decode_seconds(self) -> float | None:
        if self.finish_time is None or self.first_token_time is None:
            return None
        return self.finish_time - self.first_token_time


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A request's state after a step. ``new_token_ids``/``new_text`` are what this step added."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    metrics: RequestMetrics


class TextStream:
    """Turns a request's generated ids into text deltas, stopping at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all decoded text (up to the stop string once one is hit)
        self.emitted = 0  # characters of text handed out
        self.stopped = False

    def bind(self, tokenizer: Tokenizer) -> None:
        """Decode with ``tokenizer`` from now on (a stream that arrived from another process)."""
        self._detokenizer.bind(tokenizer)

    def push(self, token_id: int | None) -> str:
        """Add a token (None: no visible text, e.g. EOS); returns the text now safe to emit."""
        if token_id is not None:
            self.text += self._detokenizer.push(token_id)
        return self._emit(len(self.text) if self._scan() else len(self.text) - self._hold)

    def finish(self) -> str:
        """The request ended for another reason: release what was held back."""
        if not self.stopped:
            self.text += self._detokenizer.flush()
            self._scan()
        return self._emit(len(self.text))

    def _scan(self) -> bool:
        """Cut the text at the first stop string in the not yet emitted tail; True once stopped."""
        if self._stop and not self.stopped:
            start = max(0, self.emitted - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def metrics_of(seq: Sequence) -> RequestMetrics:
    return RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time, seq.finish_time,
                          seq.num_cached, seq.num_preemptions)
