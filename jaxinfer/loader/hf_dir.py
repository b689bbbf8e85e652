"""Hugging Face model directories: config.json, *.safetensors, tokenizer.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.loader.sampling_defaults import from_generation_config, read_generation_config
from jaxinfer.tokenizer import Tokenizer


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


class HFDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.hf_config = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {self.path / 'config.json'}: {exc}") from None
        self.config = ModelConfig.from_hf(self.hf_config)
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise ValueError(f"{self.path} has no *.safetensors weights")
        self.generation_config = read_generation_config(self.path)  # end-of-sequence ids, sampling defaults

    def tokenizer(self) -> Tokenizer:
        eos = self._generation_eos()
        return Tokenizer.from_dir(self.path, eos_ids=eos)

    def _generation_eos(self) -> list[int]:
        for source in (self.generation_config, self.hf_config):
            eos = source.get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        return []

    def sampling_defaults(self) -> dict[str, Any]:
        return from_generation_config(self.generation_config, str(self.path / "generation_config.json"))

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (name, float32 array) per tensor; the flax framework reads bfloat16 too."""
        from safetensors import SafetensorError, safe_open

        for file in self.files:
            try:
                with safe_open(str(file), framework="flax") as handle:
                    for name in handle.keys():
                        yield name, np.asarray(handle.get_tensor(name), dtype=np.float32)
            except SafetensorError as exc:
                raise ValueError(f"{file} is not a readable safetensors file: {exc}") from None
