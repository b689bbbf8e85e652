"""UniSparse block-sparse prefill attention: composite-token block scoring, block selection and
block-sparse attention (references first; kernels and the fast CPU path build on them)."""

from pallas_kernels.unisparse.reference import (
    UniSparseConfig,
    block_scores,
    block_sparse_attention_reference,
    block_sparse_attention_xla,
    select_blocks,
)

__all__ = ["UniSparseConfig", "block_scores", "block_sparse_attention_reference", "block_sparse_attention_xla",
           "select_blocks"]
