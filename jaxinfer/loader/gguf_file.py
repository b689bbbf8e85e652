"""GGUF files: metadata -> ModelConfig and Tokenizer; tensors dequantized with the ``gguf`` package, or
kept as the file's blocks for the quantized CPU path."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.layers import quant
from jaxinfer.loader.sampling_defaults import from_gguf
from jaxinfer.tokenizer import Tokenizer

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate-half halves).

    llama.cpp's converter reorders each head's rows from [first half, second half] to
    [pairs (i, i + D/2) interleaved]; this puts them back. Works on [out, in] weights and [out] biases.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    split = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def _reader(path: Path):
    """gguf's reader over a plain-ndarray view of the file's memory map: the reader slices the map once
    per metadata item (about a million times for a 49K-token vocabulary), and each slice of an
    ``np.memmap`` runs Python-level bookkeeping that took 2 of the 4 s of loading the embedded model."""
    import gguf

    class PlainReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)  # still backed by the map (kept alive as its base)

    return PlainReader(str(path))


class GGUFFile:
    """An opened GGUF file: metadata, config, tokenizer and HF-named float32 tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        try:
            self._reader = _reader(self.path)
        except Exception as exc:  # the reader raises ValueError, struct.error, IndexError, ...
            raise ValueError(f"{self.path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception as exc:
                raise ValueError(f"{self.path}: corrupt GGUF metadata field {key!r} ({exc})") from None
        names = {t.name for t in self._reader.tensors}
        if "rope_freqs.weight" in names:
            raise ValueError("GGUF rope_freqs tensors (Llama 3.1 frequency factors) are not supported; "
                             "load the Hugging Face directory instead")
        self.config = ModelConfig.from_gguf(self.metadata, has_output_tensor="output.weight" in names)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf(self.metadata)

    def sampling_defaults(self) -> dict[str, Any]:
        return from_gguf(self.metadata, str(self.path))

    def block_types(self) -> list[str]:
        """Names (quant.QTYPES) of the block types the file's 2-D weights use, most common first."""
        from gguf import GGMLQuantizationType

        counts: dict[str, int] = {}
        for tensor in self._reader.tensors:
            name = GGMLQuantizationType(tensor.tensor_type).name.lower()
            if len(tensor.shape) == 2 and tensor.name != "token_embd.weight":
                counts[name] = counts.get(name, 0) + 1
        return sorted(counts, key=lambda n: -counts[n])

    def embedding_type(self) -> str:
        from gguf import GGMLQuantizationType

        tensor = next(t for t in self._reader.tensors if t.name == "token_embd.weight")
        return GGMLQuantizationType(tensor.tensor_type).name.lower()

    def tensors(self, keep_blocks: bool = False) -> Iterator[tuple[str, np.ndarray | quant.Blocks]]:
        """Yield (Hugging Face name, array in HF [out, in] layout) per tensor: float32, or with
        ``keep_blocks`` the file's own bytes as ``quant.Blocks`` for the block types the CPU kernels
        read (rows in HF order, the rest of each row's bytes untouched)."""
        from gguf import GGMLQuantizationType, quants

        for tensor in self._reader.tensors:
            name = hf_name(tensor.name)
            qtype = GGMLQuantizationType(tensor.tensor_type)
            expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            if keep_blocks and qtype.name.lower() in quant.QTYPES and len(expected) == 2:
                data = np.asarray(tensor.data, dtype=np.uint8)
                if data.shape != (expected[0], quant.row_bytes(qtype.name.lower(), expected[1])):
                    raise ValueError(f"tensor {tensor.name} ({qtype.name}) is corrupt: {data.shape} bytes "
                                     f"for a {expected} weight")
                array = quant.Blocks(qtype.name.lower(), self._unpermute(name, data), expected)
                yield name, array
                continue
            try:
                array = quants.dequantize(tensor.data, qtype)
            except NotImplementedError:
                raise ValueError(f"tensor {tensor.name}: quant type {qtype.name} cannot be dequantized "
                                 "by the installed gguf package") from None
            except Exception as exc:
                raise ValueError(f"tensor {tensor.name} ({qtype.name}) is corrupt: {exc}") from None
            array = np.asarray(array, dtype=np.float32).reshape(expected)
            yield name, self._unpermute(name, array)

    def _unpermute(self, name: str, rows: np.ndarray) -> np.ndarray:
        """q/k rows (float rows, biases or rows of blocks) back to the rotate-half layout."""
        config = self.config
        if config.architecture == "llama":
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                return unpermute_rows(rows, config.num_heads)
            if name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                return unpermute_rows(rows, config.num_kv_heads)
        return rows
