"""Test setup: CPU with 8 virtual devices, shared fixtures (tiny configs, the real model)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.datasets import shared_root  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = shared_root()


def tiny_config(**overrides) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                max_position=256, tie_word_embeddings=True)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One XLA compilation cache for the session's own compiles, empty at its start: the tests build
    many engines that compile the same step programs, and a program compiled once is loaded after
    that (tests/engine/test_engine.py: 119 s without it, 67 s with it). The compile-budget tests count
    cache requests as compiles. Processes the tests start use their own (the CLIs' default)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def reference_data():
    path = SHARED / "reference" / "reference_smollm2.json"
    if not path.is_file():
        pytest.skip(f"independent reference not found at {path} (set JAXINFER_SHARED)")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def real_model():
    from jaxinfer.loader import load_model

    return load_model("smollm2-135m", "float32")


@pytest.fixture(scope="session")
def real_engine(real_model):
    """An engine on the real model with few buckets; steps compile on first use (no warm-up)."""
    from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig
    from jaxinfer.engine.engine import Engine

    config = EngineConfig(cache=CacheConfig(num_pages=256),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=1024, max_prefill_seqs=2,
                                                    decode_buckets=(4,), prefill_buckets=(64, 256),
                                                    kv_buckets=(1024,)))
    return Engine(real_model.model, real_model.tokenizer, config)
