"""UniSparse parameters (no jax import: the host-side engine config holds one)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UniSparseConfig:
    """Block-sparse prefill parameters. The paper's body (defaults) was not recoverable; c_q = c_k = 8 and
    tau = 0.9 follow the related methods (XAttention, FlexPrefill) until measured on the real model."""

    block_size: int = dataclasses.field(default=64, metadata={"help": "tokens per query/key block"})
    c_q: int = dataclasses.field(default=8, metadata={"help": "queries pooled into one composite query"})
    c_k: int = dataclasses.field(default=8, metadata={"help": "keys pooled into one composite key"})
    tau: float = dataclasses.field(default=0.9, metadata={"help": "estimated attention mass to keep"})
    sink_blocks: int = dataclasses.field(default=1, metadata={"help": "leading key blocks always kept"})
    local_blocks: int = dataclasses.field(default=1, metadata={"help": "diagonal-and-before blocks always kept"})
    max_blocks: int = dataclasses.field(default=0, metadata={"help": "kept blocks per query block at most (0: no cap)"})
    share_kv_heads: bool = dataclasses.field(
        default=True, metadata={"help": "one selection per KV head from its query heads' mean scores"})

    def __post_init__(self) -> None:
        for name in ("block_size", "c_q", "c_k", "local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("c_q", "c_k"):
            if self.block_size % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} must divide block_size={self.block_size}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be an integer >= 0, got {self.sink_blocks!r}")
        if not isinstance(self.max_blocks, int) or self.max_blocks < 0:
            raise ValueError(f"max_blocks must be an integer >= 0, got {self.max_blocks!r}")
        if not isinstance(self.share_kv_heads, bool):
            raise ValueError(f"share_kv_heads must be a bool, got {self.share_kv_heads!r}")
