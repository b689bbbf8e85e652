"""Model loading: resolve a model spec (embedded name, .gguf, HF directory, jaxinfer checkpoint)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.loader.checkpoint import CheckpointDir, is_checkpoint_dir
from jaxinfer.loader.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, ensure_embedded
from jaxinfer.loader.gguf_file import GGUFFile
from jaxinfer.loader.hf_dir import HFDirectory, is_hf_dir
from jaxinfer.models import model_from_tensors
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    tokenizer: Tokenizer
    source: str  # what was loaded, for logs and checkpoint metadata
    load_seconds: float


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


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


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32") -> LoadedModel:
    """Load weights, config and tokenizer. Errors are ValueError/FileNotFoundError with one line."""
    jdtype = parse_dtype(dtype)
    start = time.perf_counter()
    source = resolve_source(spec)
    tokenizer = source.tokenizer()
    if isinstance(source, CheckpointDir):
        model = source.load_model(jdtype)
    else:
        model = model_from_tensors(source.config, source.tensors(), jdtype)
    if tokenizer.vocab_size > source.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{source.config.vocab_size} embeddings")
    seconds = time.perf_counter() - start
    logger.info("loaded %s in %.2f s", spec, seconds)
    return LoadedModel(model=model, config=source.config, tokenizer=tokenizer,
                       source=str(getattr(source, "path", spec)), load_seconds=seconds)
