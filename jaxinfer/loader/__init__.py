"""Model loading: resolve a model spec (embedded name, .gguf, HF directory, jaxinfer checkpoint)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import DEFAULT_MODEL, WEIGHT_DTYPES, ModelConfig
from jaxinfer.layers import quant
from jaxinfer.layers.linear import QuantSpec
from jaxinfer.loader.checkpoint import CheckpointDir, is_checkpoint_dir
from jaxinfer.loader.embedded import EMBEDDED_MODELS, ensure_embedded
from jaxinfer.loader.gguf_file import GGUFFile
from jaxinfer.loader.hf_dir import HFDirectory, is_hf_dir
from jaxinfer.models import model_from_tensors
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    tokenizer: Tokenizer
    source: str  # what was loaded, for logs and checkpoint metadata
    load_seconds: float
    sampling_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # the model's own


def parse_dtype(name: str):
    if name not in FLOAT_DTYPES:
        raise ValueError(f"unsupported float dtype {name!r} (supported: {', '.join(FLOAT_DTYPES)})")
    return FLOAT_DTYPES[name]


def weight_format(name: str, source=None) -> tuple[str, QuantSpec | None]:
    """``--dtype`` -> (float dtype name, quantization or None) for ``source`` (what resolve_source opened)."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(WEIGHT_DTYPES)})")
    if name in FLOAT_DTYPES:
        return name, None
    if name in quant.QTYPES:
        return "float32", QuantSpec(linear=name, embed="q8_0")
    if isinstance(source, CheckpointDir):  # the format it was converted to
        stored = source.meta.get("dtype", "float32")
        return (stored if stored in FLOAT_DTYPES else "float32"), source.quant_spec
    config = source.config
    widths = (config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim)
    if not quant.kernels_available() or any(width % quant.BLOCK for width in widths):
        import jax

        return ("float32" if jax.default_backend() == "cpu" else "bfloat16"), None
    if isinstance(source, GGUFFile):
        types = [t for t in source.block_types() if t in quant.QTYPES]
        embed = source.embedding_type()
        return "float32", QuantSpec(linear=types[0] if types else "q8_0",
                                    embed=embed if embed in quant.QTYPES else "q8_0")
    return "float32", QuantSpec(linear="q8_0", embed="q8_0")


def resolve_source(spec: str):
    """Open what ``spec`` names: GGUFFile, HFDirectory or CheckpointDir (nothing is loaded yet)."""
    if spec in EMBEDDED_MODELS:
        return GGUFFile(ensure_embedded(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic == b"GGUF":
            return GGUFFile(path)
        raise ValueError(f"{path} is not a GGUF file (bad magic {magic!r})")
    if is_checkpoint_dir(path):
        return CheckpointDir(path)
    if is_hf_dir(path):
        return HFDirectory(path)
    if path.is_dir():
        raise ValueError(f"{path} is neither a Hugging Face model directory (config.json) "
                         "nor a jaxinfer checkpoint (jaxinfer_model.json)")
    if "/" in spec or spec.endswith(".gguf") or spec.startswith("."):
        raise FileNotFoundError(f"model path not found: {spec}")
    raise ValueError(f"unknown model {spec!r}: known names are {', '.join(EMBEDDED_MODELS)}; "
                     "or pass a .gguf file, a Hugging Face directory or a jaxinfer checkpoint directory")


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "auto") -> LoadedModel:
    """Load weights, config and tokenizer in the format ``dtype`` names (see jaxinfer.config.WEIGHT_DTYPES and
    ``weight_format``). Errors are ValueError/FileNotFoundError with one line."""
    start = time.perf_counter()
    source = resolve_source(spec)
    float_name, quant_spec = weight_format(dtype, source)
    jdtype = parse_dtype(float_name)
    tokenizer = source.tokenizer()
    sampling = source.sampling_defaults()
    if not sampling and spec in EMBEDDED_MODELS:
        sampling = dict(EMBEDDED_MODELS[spec].sampling)
    if isinstance(source, CheckpointDir):
        model = source.load_model(jdtype, quant_spec)
    elif isinstance(source, GGUFFile):
        model = model_from_tensors(source.config, source.tensors(keep_blocks=quant_spec is not None), jdtype,
                                   quant_spec)
    else:
        model = model_from_tensors(source.config, source.tensors(), jdtype, quant_spec)
    if tokenizer.vocab_size > source.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{source.config.vocab_size} embeddings")
    seconds = time.perf_counter() - start
    logger.info("loaded %s as %s in %.2f s", spec,
                float_name if quant_spec is None else f"{quant_spec.linear} (embedding {quant_spec.embed})", seconds)
    return LoadedModel(model=model, config=source.config, tokenizer=tokenizer,
                       source=str(getattr(source, "path", spec)), load_seconds=seconds, sampling_defaults=sampling)
