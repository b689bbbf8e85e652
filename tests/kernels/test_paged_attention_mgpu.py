"""The Mosaic GPU body of the paged attention kernels (ragged paged attention, tree attention) and UniSparse
scoring's Triton-free GPU path: equal to float64 loops in the Mosaic GPU interpreter (jax >= 0.11), lowered
for cuda with the chosen body under every jax, chosen only where asked and where it serves the shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import UniSparseConfig
from pallas_kernels import paged_attention_mgpu as mgpu
from pallas_kernels._mgpu import interpret_params
from pallas_kernels.ragged_paged_attention import BlockSizes, ragged_paged_attention
from pallas_kernels.tree_attention import tree_attention
from pallas_kernels.unisparse.block_scores_kernel import block_scores_pallas
from pallas_kernels.unisparse.reference import block_scores
from tests.kernels.test_ragged_paged_attention import _make_inputs as ragged_inputs
from tests.kernels.test_ragged_paged_attention import _numpy_attention
from tests.kernels.test_tree_attention import _kv_lens, _numpy_tree_attention
from tests.kernels.test_tree_attention import _make_inputs as tree_inputs
from tests.lowering import lowered_text

PAGE = 16
BLOCKS = BlockSizes(block_q=16, pages_per_block=4)  # 64 slots a step: wgmma's tile
needs_interpreter = pytest.mark.skipif(interpret_params() is None,
                                       reason="this jax has no Mosaic GPU interpreter (jax >= 0.11)")

# (q_lens, kv_lens, max_num_seqs, num_tokens): decode rows; a mix of prompts, decodes and an empty one
RAGGED = {
    "decode": ([1, 1, 1, 1], [1, PAGE - 1, 4 * PAGE + 3, 9 * PAGE], 5, 5),
    "mixed": ([1, 3, 0, 1, PAGE + 1, 2], [PAGE - 1, 3, 5, 4 * PAGE + 3, 2 * PAGE, 2], 8, 30),
}


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)


@needs_interpreter
@pytest.mark.parametrize("case, group, block_q", [("decode", 4, 1), ("mixed", 2, 16), ("mixed", 3, 16)])
def test_interpreted_ragged_body_equals_float64(case, group, block_q):
    args = ragged_inputs(*RAGGED[case], group=group, head_dim=64, page_size=PAGE, dtype=jnp.bfloat16)
    got = ragged_paged_attention(*args, block_sizes=BlockSizes(block_q=block_q, pages_per_block=4),
                                 interpret=interpret_params())
    assert got.dtype == jnp.bfloat16
    _close(got, _numpy_attention(*args))


@needs_interpreter
@pytest.mark.parametrize("num_nodes, group", [(6, 2), (40, 3)])  # one ancestor word; two, and 128 tile rows
def test_interpreted_tree_body_equals_float64(num_nodes, group):
    args = tree_inputs(_kv_lens(PAGE), group=group, page_size=PAGE, num_nodes=num_nodes, head_dim=64,
                       dtype=jnp.bfloat16)
    got = tree_attention(*args, pages_per_block=4, interpret=interpret_params())
    assert got.dtype == jnp.float32
    _close(got, _numpy_tree_attention(*args))


@needs_interpreter
def test_interpreter_refuses_shapes_the_body_cannot_serve():
    args = ragged_inputs(*RAGGED["decode"], group=2, head_dim=64, page_size=PAGE)  # float32
    with pytest.raises(ValueError, match="Mosaic GPU body needs 16-bit"):
        ragged_paged_attention(*args, block_sizes=BLOCKS, interpret=interpret_params())


def _abstract(args):
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]


@pytest.mark.parametrize("body, target, absent", [("mosaic", "mosaic_gpu", "triton"),
                                                  ("triton", "__gpu$xla.gpu.triton", "mosaic_gpu")])
@pytest.mark.parametrize("group, block_q", [(4, 1), (8, 16)])  # decode rows; 128 tile rows (8B's prefill)
def test_ragged_lowers_for_cuda_with_the_chosen_body(body, target, absent, group, block_q):
    args = ragged_inputs(*RAGGED["mixed"], group=group, head_dim=128, page_size=PAGE, dtype=jnp.bfloat16)
    fn = jax.jit(functools.partial(ragged_paged_attention, interpret=False, gpu_body=body,
                                   block_sizes=BlockSizes(block_q=block_q, pages_per_block=4)))
    text = lowered_text(lambda: fn.trace(*_abstract(args)), "cuda")
    assert target in text and absent not in text


@pytest.mark.parametrize("body, target, absent", [("mosaic", "mosaic_gpu", "triton"),
                                                  ("triton", "__gpu$xla.gpu.triton", "mosaic_gpu")])
def test_tree_lowers_for_cuda_with_the_chosen_body(body, target, absent):
    args = tree_inputs(_kv_lens(PAGE), group=4, page_size=PAGE, num_nodes=16, head_dim=128, dtype=jnp.bfloat16)
    fn = jax.jit(functools.partial(tree_attention, pages_per_block=4, interpret=False, gpu_body=body))
    text = lowered_text(lambda: fn.trace(*_abstract(args)), "cuda")
    assert target in text and absent not in text


def test_shapes_the_body_cannot_serve_keep_the_triton_body():
    args = ragged_inputs(*RAGGED["mixed"], group=2, head_dim=128, page_size=PAGE, dtype=jnp.float32)
    fn = jax.jit(functools.partial(ragged_paged_attention, interpret=False, gpu_body="mosaic", block_sizes=BLOCKS))
    assert "__gpu$xla.gpu.triton" in lowered_text(lambda: fn.trace(*_abstract(args)), "cuda")


def test_body_choice():
    shapes = dict(head_dim=128, page_size=16, pages_per_block=4, rows=64)
    assert mgpu.supported(jnp.bfloat16, jnp.bfloat16, **shapes) and mgpu.supported(jnp.float16, jnp.float16, **shapes)
    assert not mgpu.supported(jnp.float32, jnp.float32, **shapes)  # wgmma here takes 16-bit operands
    assert not mgpu.supported(jnp.bfloat16, jnp.float16, **shapes)
    assert not mgpu.supported(jnp.bfloat16, jnp.bfloat16, **{**shapes, "head_dim": 96})
    assert not mgpu.supported(jnp.bfloat16, jnp.bfloat16, **{**shapes, "pages_per_block": 2})  # 32 slots a step
    assert not mgpu.supported(jnp.bfloat16, jnp.bfloat16, **{**shapes, "page_size": 4, "pages_per_block": 16})
    assert not mgpu.supported(jnp.bfloat16, jnp.bfloat16, **{**shapes, "rows": 129})  # one warpgroup's registers
    assert [mgpu.tile_rows(n) for n in (1, 64, 65, 128)] == [64, 64, 128, 128]


def _scoring_case():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(256, 4, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(384, 2, 64)), jnp.bfloat16)
    return q, k, UniSparseConfig(local_blocks=1, c_h=1, block_size=64, c_q=4, c_k=4, tau=0.5)


@pytest.mark.parametrize("body, triton", [("mosaic", False), ("triton", True)])
def test_scoring_on_cuda_runs_without_triton_beside_mosaic_bodies(body, triton):
    q, k, config = _scoring_case()
    fn = jax.jit(lambda q, k, q_start, kv_len: block_scores_pallas(q, k, config, q_start, kv_len, interpret=False,
                                                                   gpu_body=body))
    text = lowered_text(lambda: fn.trace(q, k, 128, 350), "cuda")
    assert ("__gpu$xla.gpu.triton" in text) == triton and "mosaic_gpu" not in text


@needs_interpreter
def test_scoring_beside_interpreted_mosaic_bodies_equals_the_reference():
    q, k, config = _scoring_case()
    got = block_scores_pallas(q, k, config, 128, 350, interpret=interpret_params())
    np.testing.assert_allclose(np.asarray(got), np.asarray(block_scores(q, k, config, 128, 350)), atol=1e-6)
