"""jaxinfer: an LLM inference engine on JAX.

Public API: ``LLM`` (offline generation), ``SamplingParams``, ``EngineConfig`` and its parts, and
``load_model`` (weights + config + tokenizer from an embedded name, GGUF, Hugging Face directory or
jaxinfer checkpoint).
"""

from jaxinfer.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from jaxinfer.engine.request_output import RequestOutput
from jaxinfer.llm import LLM
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.sampling_params import SamplingParams

__all__ = ["LLM", "CacheConfig", "EngineConfig", "LoadedModel", "ModelConfig", "RequestOutput", "SamplingParams",
           "SchedulerConfig", "load_model"]
__version__ = "0.2.0"
