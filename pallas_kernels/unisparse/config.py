"""UniSparse parameters (no jax import: the host-side engine config holds one)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UniSparseConfig:
    """Block-sparse prefill parameters.

    The paper's defaults were not recoverable. These were chosen by measuring SmolLM2-135M's perplexity
    increase, density and attention time (profiling/eval_unisparse_accuracy.py, bench_unisparse.py;
    README): query pooling costs the most accuracy (c_q = 8: +8.3% at density 0.27 on a 4K window;
    c_q = 1: +3.7% at 0.30); a wide always-kept local window buys accuracy back cheaply (16 blocks:
    +0.6% at 0.49), more so as prompts grow; averaging the 3 query heads of a KV group before scoring
    (the paper's head-level compression; c_h = 0 pools the whole group) cuts the estimate's cost 3x
    for a little accuracy, which tau = 0.96 recovers (8K: +0.8% at density 0.36). Key pooling c_k = 8
    keeps the estimate at 1/8 of the dense logits."""

    block_size: int = dataclasses.field(default=64, metadata={"help": "tokens per query/key block"})
    c_q: int = dataclasses.field(default=1, metadata={"help": "queries pooled into one composite query"})
    c_k: int = dataclasses.field(default=8, metadata={"help": "keys pooled into one composite key"})
    c_h: int = dataclasses.field(
        default=0, metadata={"help": "query heads of a KV group averaged before scoring (0: the whole group)"})
    tau: float = dataclasses.field(default=0.96, metadata={"help": "estimated attention mass to keep"})
    sink_blocks: int = dataclasses.field(default=1, metadata={"help": "leading key blocks always kept"})
    local_blocks: int = dataclasses.field(default=16, metadata={"help": "diagonal-and-before blocks always kept"})
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
        if not isinstance(self.c_h, int) or self.c_h < 0:
            raise ValueError(f"c_h must be an integer >= 0, got {self.c_h!r}")
        if not isinstance(self.max_blocks, int) or self.max_blocks < 0:
            raise ValueError(f"max_blocks must be an integer >= 0, got {self.max_blocks!r}")
        if not isinstance(self.share_kv_heads, bool):
            raise ValueError(f"share_kv_heads must be a bool, got {self.share_kv_heads!r}")
