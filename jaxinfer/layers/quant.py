"""GGUF block quantization (Q4_0, Q4_1, Q8_0) and the quantized matmul that reads the blocks as
they are.

A quantized weight is uint8 [N, K / 32 * block_bytes]: row n holds output feature n as K / 32
blocks of 32 consecutive inputs (the GGUF layout):
- q4_0 (GGML type 2), 18 bytes: f16 d, 16 bytes of nibbles; x = (q - 8) d;
- q4_1 (type 3), 20 bytes: f16 d, f16 m, 16 bytes of nibbles; x = q d + m;
- q8_0 (type 8), 34 bytes: f16 d, int8 q[32]; x = q d.
Low nibbles are elements 0..15 of a block, high nibbles 16..31.

``qmatmul`` on CPU runs the native kernels of ``jaxinfer/cpu/qmatmul.cc`` through XLA's FFI when
they are available (``kernels_available()``), and ``dequantize`` + ``jnp.einsum`` otherwise and on
every other platform (``lax.platform_dependent``: lowering for GPU/TPU never sees the custom call).
``activations='int8'`` rounds each 32-block of x to int8 (d = max|x| / 127, round to nearest even)
as llama.cpp does (which also rounds d to f16; here it stays f32), the fast path; 'float32' is the
exact weight-only product. The XLA path always uses float32 activations. ``qmatmul_reference`` is
the spec both kernels are tested against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

QTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # name -> GGML type id
BLOCK = 32
ACTIVATIONS = {"int8": 0, "float32": 1}
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
TARGET = "jaxinfer_qmatmul"
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def block_bytes(qtype: str) -> int:
    _check_qtype(qtype)
    return _BLOCK_BYTES[qtype]


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one quantized row of ``k`` inputs."""
    if k % BLOCK:
        raise ValueError(f"{qtype} rows need a multiple of {BLOCK} inputs, got {k=}")
    return k // BLOCK * block_bytes(qtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Blocks:
    """A weight kept as GGUF blocks: ``data`` uint8 [rows, row_bytes] for a float ``shape`` [rows, K]."""

    qtype: str
    data: np.ndarray
    shape: tuple[int, int]

    def dequantize(self) -> np.ndarray:
        return dequantize_numpy(self.data, self.qtype)


def _check_qtype(qtype: str) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"unsupported quantization {qtype!r} (supported: {', '.join(QTYPES)})")


# --------------------------------------------------------------------------------------------
# numpy: quantize (bit-identical to gguf.quants.quantize, i.e. llama.cpp's reference rounding)


def _roundf(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (C's roundf), exactly, in float32."""
    a = np.abs(x)
    floor = np.floor(a)
    return np.sign(x) * (floor + np.floor(2 * (a - floor)))


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """float [N, K] -> uint8 [N, row_bytes(qtype, K)] blocks, rounding as llama.cpp's reference."""
    _check_qtype(qtype)
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got {w.shape=}")
    n, k = w.shape
    rb = row_bytes(qtype, k)
    out = np.empty((n, rb), np.uint8)
    step = max(1, (1 << 22) // max(k, 1))  # rows per slice: temporaries of a few MB
    for start in range(0, n, step):
        blocks = w[start:start + step].reshape(-1, BLOCK)
        out[start:start + step] = _quantize_blocks(blocks, qtype).reshape(-1, rb)
    return out


def _quantize_blocks(x: np.ndarray, qtype: str) -> np.ndarray:
    """[B, 32] float32 -> [B, block_bytes] uint8."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if qtype == "q8_0":
            d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = _roundf(x * inv).astype(np.int8).view(np.uint8)
            return np.concatenate([d.astype(np.float16).view(np.uint8), q], axis=1)
        if qtype == "q4_0":
            peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
            d = peak / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc(x * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
            scales = [d]
        else:
            hi, lo = x.max(axis=1, keepdims=True), x.min(axis=1, keepdims=True)
            d = (hi - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc((x - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
            scales = [d, lo]
    packed = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([s.astype(np.float16).view(np.uint8) for s in scales] + [packed], axis=1)


def dequantize_numpy(w: np.ndarray, qtype: str) -> np.ndarray:
    """uint8 [..., N, row_bytes] -> float32 [..., N, K] (numpy; same values as ``dequantize``)."""
    _check_qtype(qtype)
    w = np.asarray(w, np.uint8)
    blocks = w.reshape(*w.shape[:-1], -1, _BLOCK_BYTES[qtype])
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [..., nb, 1]
    if qtype == "q8_0":
        x = blocks[..., 2:].copy().view(np.int8).astype(np.float32) * d
    else:
        qs = blocks[..., 4:] if qtype == "q4_1" else blocks[..., 2:]
        q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)
        if qtype == "q4_0":
            x = (q.astype(np.int8) - np.int8(8)).astype(np.float32) * d
        else:
            x = q.astype(np.float32) * d + blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    return x.reshape(*w.shape[:-1], -1)


# --------------------------------------------------------------------------------------------
# jnp


def dequantize(w: jax.Array, qtype: str) -> jax.Array:
    """uint8 [..., N, row_bytes] -> float32 [..., N, K] (also gathered rows: ``dequantize(w[tokens])``)."""
    _check_qtype(qtype)
    blocks = w.reshape(*w.shape[:-1], -1, _BLOCK_BYTES[qtype])  # [..., N, nb, B]

    def f16(lo: int) -> jax.Array:  # [..., N, nb, 1]
        return jax.lax.bitcast_convert_type(blocks[..., lo:lo + 2], jnp.float16).astype(jnp.float32)[..., None]

    if qtype == "q8_0":
        x = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32) * f16(0)
    else:
        qs = blocks[..., 4:] if qtype == "q4_1" else blocks[..., 2:]
        q = jnp.concatenate([qs & 15, qs >> 4], axis=-1)
        if qtype == "q4_0":
            x = (q.astype(jnp.int32) - 8).astype(jnp.float32) * f16(0)
        else:
            x = q.astype(jnp.float32) * f16(0) + f16(2)
    return x.reshape(*w.shape[:-1], -1)


def round_activations(x: jax.Array) -> jax.Array:
    """x with each 32-block along the last axis rounded as the int8 kernels do: round(x / d) d,
    d = max|x| / 127 (computed as x * (1 / d), round to nearest even)."""
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    # XLA turns "/ 127" into "* (1 / 127)", which rounds differently; an opaque divisor keeps "/"
    d = amax / jax.lax.optimization_barrier(jnp.full(amax.shape, 127, jnp.float32))
    inv = jnp.where(d == 0, jnp.float32(0), jnp.float32(1) / jnp.where(d == 0, jnp.float32(1), d))
    return (jnp.round(blocks * inv) * d).reshape(x.shape)


def qmatmul_reference(x: jax.Array, w: jax.Array, qtype: str, *, activations: str = "int8") -> jax.Array:
    """x [..., K] float, w [N, row_bytes] uint8 blocks -> float32 [..., N] = x' @ dequantize(w).T,
    x' = round_activations(x) for activations='int8', x for 'float32'."""
    _check_args(x, w, qtype, activations)
    x = x.astype(jnp.float32)
    if activations == "int8":
        x = round_activations(x)
    return jnp.einsum("...k,nk->...n", x, dequantize(w, qtype), precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


def qmatmul(x: jax.Array, w: jax.Array, qtype: str, *, activations: str = "int8", isa: str = "auto",
            num_threads: int = 0) -> jax.Array:
    """x [..., K] float, w [N, row_bytes(qtype, K)] uint8 blocks -> float32 [..., N] (x @ W.T).

    On CPU with the kernels: the FFI kernel (``isa``: 'auto' or, for tests, 'scalar' | 'avx2' |
    'avx512'; ``num_threads``: 0 = XLA's intra-op threads, run alone for a while when helpers keep
    arriving late because other processes hold the cores; n = at most n; results are the same).
    Elsewhere: dequantize + einsum with float32 activations. Leading dims of x are flattened into
    the kernel's M rows.
    """
    _check_args(x, w, qtype, activations)
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {tuple(ISAS)}, got {isa!r}")
    k, n = x.shape[-1], w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)
    use_kernels = kernels_available()
    if isa != "auto":
        if not use_kernels:
            raise RuntimeError(f"isa={isa!r} needs the CPU kernels, which are unavailable in this process")
        if isa not in supported_isas():
            raise ValueError(f"isa={isa!r} is not supported by this CPU (supported: {supported_isas()})")
    if use_kernels:
        kernel = functools.partial(_qmatmul_ffi, qtype=qtype, activations=activations, isa=isa,
                                   num_threads=num_threads)
        y = jax.lax.platform_dependent(x2, w, cpu=kernel, default=functools.partial(_qmatmul_xla, qtype=qtype))
    else:
        y = _qmatmul_xla(x2, w, qtype=qtype)
    return y.reshape(*lead, n)


def _check_args(x, w, qtype: str, activations: str) -> None:
    _check_qtype(qtype)
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {tuple(ACTIVATIONS)}, got {activations!r}")
    if x.ndim < 1 or w.ndim != 2 or w.dtype != jnp.uint8:
        raise ValueError(f"expected x [..., K] and uint8 w [N, row_bytes], got {x.shape=}, {w.shape=}, {w.dtype=}")
    if w.shape[1] != row_bytes(qtype, x.shape[-1]):
        raise ValueError(f"{qtype} weight rows of {w.shape[1]} bytes do not match K={x.shape[-1]} "
                         f"(expected {row_bytes(qtype, x.shape[-1])} bytes)")


def _qmatmul_xla(x: jax.Array, w: jax.Array, *, qtype: str) -> jax.Array:
    return jnp.einsum("mk,nk->mn", x, dequantize(w, qtype), precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


def _qmatmul_ffi(x: jax.Array, w: jax.Array, *, qtype: str, activations: str, isa: str,
                 num_threads: int) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        x, w, qtype=np.int32(QTYPES[qtype]), activations=np.int32(ACTIVATIONS[activations]),
        isa=np.int32(ISAS[isa]), num_threads=np.int32(num_threads))


# --------------------------------------------------------------------------------------------
# kernel availability


def _library():
    from jaxinfer.cpu import build

    return build.load()


def kernels_available() -> bool:
    """True when matmuls on this process's CPU backend run the native kernels (the default backend
    is CPU and the kernel library loaded; it is built on the first call)."""
    return jax.default_backend() == "cpu" and _library() is not None


def supported_isas() -> tuple[str, ...]:
    """The isa names this host's kernels run ("auto" first); ("auto",) without kernels."""
    from jaxinfer.cpu import build

    return build.isas("jaxinfer_qmatmul_isas", ISAS) if kernels_available() else ("auto",)
