"""GGUF block formats (quantize / dequantize vs the gguf package, bit for bit) and the quantized matmul:
the FFI kernels (every ISA path the host runs, both activation modes) vs the jnp reference and vs
the scalar path; the XLA fallback; lowering for GPU/TPU without the custom call.

Tolerances. int8 activations: the reference rounds x exactly as the kernels do (same f32 scale,
same products, round to nearest even), and each block's integer dot is exact, so the only
difference is the order of f32 sums over K / 32 blocks: 1e-5 of max|y| bounds it with margin (seen:
<= 7e-7). float32 activations: one f32 dot of the dequantized weights, summed in another order:
also 1e-5. Int8 rounding itself moves y by about 0.5% of max|y| (llama.cpp's behaviour), bounded at
2% below.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from jaxinfer.layers import quant
from tests.lowering import lowered_text

QTYPES = tuple(quant.QTYPES)
needs_kernels = pytest.mark.skipif(not quant.kernels_available(), reason="CPU kernels unavailable (no compiler?)")
SIMD_ISAS = [isa for isa in quant.supported_isas() if isa not in ("auto", "scalar")]
# (M, K, N): M in {1, 3, 8, 32, 512}, K in {576, 1536}, N not a multiple of any tile; then K / 32 =
# 1, 3, 5, 7 blocks (partial groups of the 2- and 4-block SIMD steps) and M = 5, 6 (partial tiles).
SHAPES = [(1, 576, 37), (3, 1536, 1000), (8, 576, 960), (32, 1536, 37), (512, 576, 1000), (1, 1536, 49),
          (1, 32, 5), (5, 96, 37), (6, 160, 13), (1, 224, 50)]
TOL = 1e-5


def _weights(n, k, qtype, seed=0):
    """Random blocks with a few special rows: all zero (d = 0), constant, one outlier per block."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0] = 0.0
    if n > 2:
        w[1] = 0.25
        w[2, ::32] = 40.0
    return quant.quantize(w, qtype)


def _inputs(m, k, seed=1):
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    x[0, :32] = 0.0  # a zero block: d = 0
    if m > 1:
        x[1, 32:64] = np.arange(32) - 15.5  # exact halves after scaling: rounding ties
    return x


def _rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


# ------------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_matches_gguf(qtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 1536)).astype(np.float32) * rng.uniform(0.01, 10, size=(300, 1))
    w[0] = 0.0
    w[1] = 3.0
    w[2, :64] = np.linspace(-1, 1, 64)  # ties in q4 rounding
    w[3, :32] = -w[3, :32].max()  # equal |max| with opposite signs
    ggml = GGMLQuantizationType(quant.QTYPES[qtype])
    expected = gguf_quants.quantize(w, ggml)
    got = quant.quantize(w, qtype)
    assert got.dtype == np.uint8 and got.shape == (300, quant.row_bytes(qtype, 1536))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_gguf(qtype):
    blocks = _weights(200, 576, qtype)
    expected = gguf_quants.dequantize(blocks, GGMLQuantizationType(quant.QTYPES[qtype]))
    got = np.asarray(jax.jit(quant.dequantize, static_argnums=1)(blocks, qtype))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(quant.dequantize_numpy(blocks, qtype).view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(quant.Blocks(qtype, blocks, (200, 576)).dequantize(), expected)
    tokens = jnp.array([[5, 0, 199], [7, 7, 1]])  # gathered embedding rows, leading dims kept
    rows = np.asarray(quant.dequantize(jnp.asarray(blocks)[tokens], qtype))
    np.testing.assert_array_equal(rows, expected[np.asarray(tokens)])


def test_row_bytes_and_errors():
    assert [quant.block_bytes(q) for q in QTYPES] == [18, 20, 34]
    assert quant.row_bytes("q4_1", 576) == 360
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.row_bytes("q8_0", 100)
    with pytest.raises(ValueError, match="unsupported quantization"):
        quant.block_bytes("q5_0")
    x, w = jnp.zeros((2, 64)), jnp.zeros((3, quant.row_bytes("q8_0", 64)), jnp.uint8)
    with pytest.raises(ValueError, match="do not match"):
        quant.qmatmul(x, w, "q4_0")
    with pytest.raises(ValueError, match="activations"):
        quant.qmatmul(x, w, "q8_0", activations="int4")
    with pytest.raises(ValueError, match="isa"):
        quant.qmatmul(x, w, "q8_0", isa="neon")


# ------------------------------------------------------------------------------------------------
# kernels


@functools.cache
def _jitted(qtype, activations, isa, num_threads):
    return jax.jit(functools.partial(quant.qmatmul, qtype=qtype, activations=activations, isa=isa,
                                     num_threads=num_threads))


def _run(x, w, qtype, activations, isa, num_threads=0):
    return np.asarray(_jitted(qtype, activations, isa, num_threads)(x, w))


@needs_kernels
@pytest.mark.parametrize("activations", ["int8", "float32"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernels_match_reference(m, k, n, qtype, activations):
    w, x = _weights(n, k, qtype, seed=m + n), _inputs(m, k, seed=k)
    ref = np.asarray(jax.jit(lambda x, w: quant.qmatmul_reference(x, w, qtype, activations=activations))(x, w))
    scalar = _run(x, w, qtype, activations, "scalar")
    assert scalar.shape == (m, n)
    assert _rel_err(scalar, ref) < TOL
    for isa in [*SIMD_ISAS, "auto"]:
        got = _run(x, w, qtype, activations, isa)
        assert _rel_err(got, ref) < TOL, isa
        assert _rel_err(got, scalar) < TOL, isa


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
def test_int8_rounding_error_is_small(qtype):
    """The int8 path against the exact product: llama.cpp-like error, a fraction of a percent."""
    w, x = _weights(500, 1536, qtype), _inputs(4, 1536)
    exact = np.asarray(quant.qmatmul_reference(x, w, qtype, activations="float32"))
    fast = _run(x, w, qtype, "int8", "auto")
    assert 1e-4 < _rel_err(fast, exact) < 2e-2


@needs_kernels
def test_threads_and_leading_dims():
    """Every output is computed by one thread in a fixed order: 1 thread == all threads, bit for bit;
    leading dims of x are flattened rows."""
    w, x = _weights(4099, 576, "q4_1"), _inputs(6, 576)
    for isa in ["scalar", *SIMD_ISAS]:
        for activations in ("int8", "float32"):
            one = _run(x, w, "q4_1", activations, isa, num_threads=1)
            np.testing.assert_array_equal(_run(x, w, "q4_1", activations, isa), one)
    y = np.asarray(jax.jit(lambda x, w: quant.qmatmul(x, w, "q4_1"))(x.reshape(2, 3, 576), w))
    np.testing.assert_array_equal(y.reshape(6, -1), _run(x, w, "q4_1", "int8", "auto"))


@needs_kernels
def test_isa_the_host_lacks_raises(monkeypatch):
    monkeypatch.setattr(quant, "supported_isas", lambda: ("auto", "scalar"))
    w, x = _weights(37, 576, "q8_0"), _inputs(3, 576)
    with pytest.raises(ValueError, match="not supported by this CPU"):
        quant.qmatmul(x, w, "q8_0", isa="avx2")


@needs_kernels
def test_cpu_lowering_uses_the_kernel():
    w, x = _weights(37, 576, "q8_0"), _inputs(3, 576)
    text = jax.jit(lambda x, w: quant.qmatmul(x, w, "q8_0")).trace(x, w).lower().as_text()
    assert quant.TARGET in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gpu_tpu_lowering_has_no_custom_call(platform):
    x = jax.ShapeDtypeStruct((3, 576), jnp.float32)
    w = jax.ShapeDtypeStruct((37, quant.row_bytes("q4_1", 576)), jnp.uint8)
    fn = jax.jit(lambda x, w: quant.qmatmul(x, w, "q4_1"))
    text = lowered_text(lambda: fn.trace(x, w), platform)
    assert "jaxinfer" not in text and "custom_call" not in text


_FALLBACK = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxinfer.layers import quant
    qtype, path = sys.argv[1], sys.argv[2]
    data = np.load(path)
    x, w = data["x"], data["w"]
    fn = jax.jit(lambda x, w: quant.qmatmul(x, w, qtype))
    y = np.asarray(fn(x, w))
    xla = np.asarray(jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x, quant.dequantize(w, qtype),
                                                        precision=jax.lax.Precision.HIGHEST))(x, w))
    print(json.dumps({"available": quant.kernels_available(), "equal": bool(np.array_equal(y, xla)),
                      "custom_call": "custom_call" in fn.trace(x, w).lower().as_text()}))
""")


def test_fallback_without_kernels(tmp_path):
    """JAXINFER_CPU_KERNELS=0: dequantize + einsum with float32 activations, no custom call."""
    qtype = "q4_0"
    w, x = _weights(37, 576, qtype), _inputs(3, 576)
    np.savez(tmp_path / "inputs.npz", x=x, w=w)
    env = dict(os.environ, JAXINFER_CPU_KERNELS="0", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _FALLBACK, qtype, str(tmp_path / "inputs.npz")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"available": False, "equal": True, "custom_call": False}
    exact = np.asarray(quant.qmatmul_reference(x, w, qtype, activations="float32"))
    assert _rel_err(np.asarray(quant._qmatmul_xla(jnp.asarray(x), jnp.asarray(w), qtype=qtype)), exact) < TOL
