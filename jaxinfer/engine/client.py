"""What a server holds of the engine: the ``EngineClient`` protocol that one ``AsyncEngine`` and the
replica groups' ``Cluster`` both implement (jaxinfer.serve uses nothing else), and ``EngineInfo``,
the facts about the served model a front end needs to tokenize and validate requests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    tokenizer: Any  # jaxinfer.tokenizer.Tokenizer: text <-> ids, chat templates
    max_model_len: int  # prompt + output tokens a request may reach
    vocab_size: int


class EngineClient(Protocol):
    """A running engine (or a group of replicas) behind a server."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def alive(self) -> bool: ...

    @property
    def metrics(self) -> Any: ...  # jaxinfer.engine.engine.EngineMetrics

    async def add_request(self, prompt: str | Seq[int], params: Any, request_id: str | None = None) -> Any:
        """Queue a request; returns its stream of RequestOutputs (raises ValueError on bad input)."""

    def abort(self, request_id: str) -> None: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
