"""jaxinfer: an LLM inference engine on JAX.

Public API: ``LLM`` (offline generation), ``SamplingParams``, ``EngineConfig`` and its parts, and
``load_model`` (weights + config + tokenizer from an embedded name, GGUF, Hugging Face directory or
jaxinfer checkpoint).
"""

import importlib
import importlib.metadata

_EXPORTS = {"CacheConfig": "jaxinfer.config", "EngineConfig": "jaxinfer.config", "ModelConfig": "jaxinfer.config",
            "SchedulerConfig": "jaxinfer.config", "RequestOutput": "jaxinfer.engine.request_output",
            "LLM": "jaxinfer.llm", "LoadedModel": "jaxinfer.loader", "load_model": "jaxinfer.loader",
            "SamplingParams": "jaxinfer.sampling_params"}


def __getattr__(name: str):
    """Imported on first use, so that host-only subpackages (jaxinfer.router) load without jax."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")


__all__ = ["LLM", "CacheConfig", "EngineConfig", "LoadedModel", "ModelConfig", "RequestOutput", "SamplingParams",
           "SchedulerConfig", "load_model"]
try:  # the installed distribution's version (pyproject.toml), one place to bump
    __version__ = importlib.metadata.version("jaxinfer")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
