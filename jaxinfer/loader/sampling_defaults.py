"""A model's own sampling defaults: the values its authors ship (Hugging Face ``generation_config.json``,
a GGUF's ``general.sampling.*`` keys, or the model card of an embedded model). The servers apply them to
every field a request leaves unset, before their API's own convention."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxinfer.sampling_params import SamplingParams

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}


def checked(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` as SamplingParams accepts them; a ValueError naming ``where`` otherwise."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown sampling default(s) {', '.join(sorted(unknown))}")
    typed = {name: (int(v) if name == "top_k" else float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool)
             else v for name, v in values.items()}
    try:
        SamplingParams(**typed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad sampling default: {exc}") from None
    return typed


def from_generation_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The sampling fields a ``generation_config.json`` sets explicitly. ``do_sample: false`` means greedy
    (as in transformers); keys left out keep the API's convention (transformers' own implicit defaults,
    e.g. top_k 50, are not the model's choice and are not applied)."""
    values = {name: config[name] for name in FIELDS if config.get(name) is not None}
    if config.get("do_sample") is False:
        values = {"temperature": 0.0, **{k: v for k, v in values.items() if k == "repetition_penalty"}}
    return checked(values, where)


def read_generation_config(directory: Path) -> dict[str, Any]:
    """``directory/generation_config.json`` as a dict ({} when absent)."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


def from_gguf(metadata: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``general.sampling.*`` values a GGUF file carries."""
    return checked({field: metadata[key] for key, field in GGUF_KEYS.items() if key in metadata}, where)


def describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {values[name]:g}" for name in FIELDS if name in values) or "none"
