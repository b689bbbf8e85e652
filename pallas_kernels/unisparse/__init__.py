"""UniSparse block-sparse prefill attention: composite-token block scoring, block selection and
block-sparse attention, as pure-jnp references, XLA paths for CPU and Pallas kernels for GPU/TPU."""

from pallas_kernels.unisparse.attention import Selection, dense_attention, select, sparse_attention
from pallas_kernels.unisparse.block_scores_kernel import block_scores_pallas
from pallas_kernels.unisparse.block_sparse_attention import block_sparse_attention, causal_block_lists
from pallas_kernels.unisparse.reference import (
    Sparsity,
    block_scores,
    block_sparse_attention_reference,
    select_blocks,
)
from pallas_kernels.unisparse.xla import block_sparse_attention_xla, dense_blocked_attention_xla

__all__ = ["Selection", "Sparsity", "block_scores", "block_scores_pallas", "block_sparse_attention",
           "block_sparse_attention_reference", "block_sparse_attention_xla", "causal_block_lists", "dense_attention",
           "dense_blocked_attention_xla", "select", "select_blocks", "sparse_attention"]
