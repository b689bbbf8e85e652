"""UniSparse block-sparse prefill attention: composite-token block scoring, block selection and
block-sparse attention, as pure-jnp references, XLA paths for CPU and Pallas kernels for GPU/TPU."""

from pallas_kernels.unisparse.reference import (
    UniSparseConfig,
    block_scores,
    block_sparse_attention_reference,
    select_blocks,
)
from pallas_kernels.unisparse.xla import block_sparse_attention_xla, dense_blocked_attention_xla

__all__ = ["UniSparseConfig", "block_scores", "block_sparse_attention_reference", "block_sparse_attention_xla",
           "dense_blocked_attention_xla", "select_blocks"]
