"""Pallas kernels for GPU and TPU, each with a pure-jnp reference of the same contract.

Dispatch between a kernel and its reference is resolved once by ``_backend`` when a model runner
is built; kernels live one op per module (see STYLE.md 1.4).
"""

from pallas_kernels._backend import resolve_gpu_body, resolve_impl, resolve_interpret
from pallas_kernels.ragged_paged_attention import (
    BlockSizes,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.tree_attention import tree_attention, tree_attention_reference

__all__ = ["BlockSizes", "ragged_paged_attention", "ragged_paged_attention_reference", "resolve_gpu_body",
           "resolve_impl", "resolve_interpret", "tree_attention", "tree_attention_reference"]
