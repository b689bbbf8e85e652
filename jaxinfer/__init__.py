"""jaxinfer: an LLM inference engine on JAX.

Public API: ``load_model`` (weights + config + tokenizer from an embedded name, GGUF, Hugging Face
directory or jaxinfer checkpoint), ``Generator`` (batch generation) and ``SamplingParams``.
"""

from jaxinfer.config import ModelConfig
from jaxinfer.generator import GenerationResult, Generator
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.sampling_params import SamplingParams

__all__ = ["GenerationResult", "Generator", "LoadedModel", "ModelConfig", "SamplingParams", "load_model"]
__version__ = "0.1.0"
