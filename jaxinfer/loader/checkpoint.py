"""jaxinfer checkpoint directories (orbax): params, model config and tokenizer, for fast reload.

Layout: ``DIR/jaxinfer_model.json`` (format marker, config, dtype, quantization, sampling defaults),
``DIR/params`` (orbax StandardCheckpointer of the flat parameter dict), ``DIR/tokenizer/`` (tokenizer.json
+ config).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.layers.linear import QuantSpec
from jaxinfer.loader.sampling_defaults import checked
from jaxinfer.models import model_from_values, param_shapes
from jaxinfer.tokenizer import Tokenizer

MARKER = "jaxinfer_model.json"
FORMAT = "jaxinfer-orbax-v1"


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def _flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    _, state = nnx.split(model)
    return {".".join(map(str, path)): leaf[...] for path, leaf in nnx.to_flat_state(state)}


def save_checkpoint(directory: str | Path, model: nnx.Module, tokenizer: Tokenizer, *, source: str,
                    sampling: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (orbax), its tokenizer and metadata; ``sampling``: the source's sampling defaults."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists():
        if not is_checkpoint_dir(directory) and any(directory.iterdir()):
            raise ValueError(f"{directory} exists and is not a jaxinfer checkpoint; refusing to overwrite")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    params = _flat_params(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params)
    checkpointer.wait_until_finished()
    tokenizer.save(directory / "tokenizer")
    spec = model.quant_spec
    meta = {"format": FORMAT, "config": model.config.to_dict(), "dtype": str(model.dtype),
            "quant": None if spec is None else spec.to_dict(), "source": source, "sampling": dict(sampling or {})}
    (directory / MARKER).write_text(json.dumps(meta, indent=1))


class CheckpointDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        try:
            self.meta = json.loads((self.path / MARKER).read_text())
            if self.meta.get("format") != FORMAT:
                raise ValueError(f"unknown checkpoint format {self.meta.get('format')!r}")
            self.config = ModelConfig.from_dict(self.meta["config"])
            stored = self.meta.get("quant")
            self.quant_spec = None if stored is None else QuantSpec(**stored)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path} is not a valid jaxinfer checkpoint: {exc}") from None

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_dir(self.path / "tokenizer")

    def sampling_defaults(self) -> dict[str, Any]:
        stored = self.meta.get("sampling") or {}
        if not isinstance(stored, dict):
            raise ValueError(f"{self.path / MARKER}: sampling must be a JSON object")
        return checked(stored, str(self.path / MARKER))

    def load_model(self, dtype, quant_spec: QuantSpec | None = None) -> nnx.Module:
        import orbax.checkpoint as ocp

        if quant_spec != self.quant_spec and (quant_spec is not None or self.quant_spec is not None):
            held = "float weights" if self.quant_spec is None else f"{self.quant_spec.linear} blocks"
            raise ValueError(f"{self.path} holds {held}: load it with --dtype auto, or convert the original "
                             "model again with the dtype you want")
        shapes = param_shapes(self.config, dtype, quant_spec)
        target = {".".join(map(str, path)): shape for path, shape in shapes.items()}
        try:
            restored = ocp.StandardCheckpointer().restore(self.path / "params", target)
        except Exception as exc:  # orbax raises many types for missing or damaged files
            first_line = (str(exc).splitlines() or [""])[0]
            raise ValueError(f"cannot restore parameters from {self.path / 'params'}: "
                             f"{type(exc).__name__}: {first_line}") from None
        values = {path: restored[".".join(map(str, path))] for path in shapes}
        return model_from_values(self.config, values, dtype, quant_spec)
