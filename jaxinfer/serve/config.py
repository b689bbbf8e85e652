"""What ``python -m jaxinfer.serve`` is told: the server's own settings (ServeConfig) plus the engine's
(EngineConfig), from command-line flags over an optional TOML file over the defaults.

A config file has one table per concern; every key is optional::

    model = "smollm2-135m"          # top level: ServeConfig fields
    grpc_port = 9000
    [cache]                         # CacheConfig
    kv_memory_gib = 4.0
    [scheduler]                     # SchedulerConfig, bucket tuples included
    max_num_seqs = 16
    decode_buckets = [1, 8, 16]
    [cluster]                       # ClusterConfig: replicas = "4", router = "cascade", ...
    [engine]                        # attention_impl, max_logprobs, sparse_prefill, sparse_min_len, sparse_tau,
                                    # speculative, draft, spec_depth, spec_nodes, spec_top_k, spec_max_batch
    max_logprobs = 5
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxinfer.cli import add_dataclass_arguments, dataclass_from_args
from jaxinfer.config import (
    SPARSE_PREFILL_MODES,
    SPEC_METHODS,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    SparsePrefillConfig,
    SpeculativeConfig,
    UniSparseConfig,
)
from jaxinfer.loader import DEFAULT_MODEL, DTYPE_HELP, DTYPES
from jaxinfer.router.base import MIGRATION_MODES
from jaxinfer.router.baselines import ROUTERS

SAMPLING_DEFAULTS = ("model", "api")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Replica groups on this host and the router in front of them (CascadeInfer)."""

    replicas: str = dataclasses.field(default="1", metadata={
        "help": "replica groups: N (the devices split N ways) or NxD (N groups of D devices); on CPU set "
                "XLA_FLAGS=--xla_force_host_platform_device_count to get several devices"})
    router: str = dataclasses.field(default="cascade", metadata={
        "help": f"how requests are placed and moved: {', '.join(ROUTERS)}"})
    migration: str = dataclasses.field(default="auto", metadata={
        "help": "how a request moves between replicas: live (KV copy), recompute, auto (cheaper by the cost model)"})
    cost_model: str = dataclasses.field(default="", metadata={
        "help": "step-time profile from launch/profile_cost_model.py (empty: $JAXINFER_CACHE/cost_model.json, "
                "else the CPU profile shipped in profiling/results)"})

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.migration not in MIGRATION_MODES:
            raise ValueError(f"migration must be one of {', '.join(MIGRATION_MODES)}, got {self.migration!r}")
        parts = self.replicas.lower().split("x")
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"replicas must look like 4 or 4x2 (groups x devices each), got {self.replicas!r}")

    @property
    def enabled(self) -> bool:
        return self.replicas != "1" or self.router != "cascade"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """The server: what it loads, where it listens, how it shuts down."""

    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata={
        "help": "embedded model name, .gguf file, Hugging Face directory or jaxinfer checkpoint"})
    dtype: str = dataclasses.field(default="auto", metadata={"help": DTYPE_HELP})
    served_model_name: str = dataclasses.field(default="", metadata={
        "help": "the model name clients send and /v1/models lists (empty: the --model value)"})
    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address both APIs bind to"})
    grpc_port: int = dataclasses.field(default=9000, metadata={"help": "gRPC port (0 = any free port)"})
    http_port: int = dataclasses.field(default=8000, metadata={"help": "HTTP port (0 = any free port)"})
    profiler_port: int = dataclasses.field(default=0, metadata={
        "help": "start jax.profiler's server on this port for live XProf capture (0 = off)"})
    drain_timeout: float = dataclasses.field(default=30.0, metadata={
        "help": "seconds in-flight requests get to finish at shutdown before they are cancelled"})
    max_request_bytes: int = dataclasses.field(default=4 * 2**20, metadata={
        "help": "largest request body (HTTP) or message (gRPC) accepted"})
    max_prompts_per_request: int = dataclasses.field(default=64, metadata={
        "help": "prompts one /v1/completions request may batch"})
    warm_up: bool = dataclasses.field(default=True, metadata={
        "help": "compile every step shape before serving (otherwise on first use)"})
    background_compile: bool = dataclasses.field(default=True, metadata={
        "help": "with warm_up: compile the largest step shape of each kind before serving and the rest while "
                "serving (steps run padded to a compiled shape meanwhile)"})
    sampling_defaults: str = dataclasses.field(default="model", metadata={
        "help": "what a request's unset sampling fields take: model (the model's generation_config.json, GGUF "
                "general.sampling.* or model card, then the API's convention) or api (the API's convention only: "
                "OpenAI temperature 1.0, gRPC and JetStream greedy)"})
    cluster: ClusterConfig = ClusterConfig()  # flags and the [cluster] table

    def __post_init__(self) -> None:
        if self.sampling_defaults not in SAMPLING_DEFAULTS:
            raise ValueError(f"sampling_defaults must be one of {', '.join(SAMPLING_DEFAULTS)}, "
                             f"got {self.sampling_defaults!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("grpc_port", "http_port", "profiler_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 65536:
                raise ValueError(f"{name} must be a port number in [0, 65535], got {value!r}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds, got {self.drain_timeout!r}")
        if not isinstance(self.max_request_bytes, int) or self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be an integer >= 1024, got {self.max_request_bytes!r}")
        if not isinstance(self.max_prompts_per_request, int) or self.max_prompts_per_request < 1:
            raise ValueError(f"max_prompts_per_request must be >= 1, got {self.max_prompts_per_request!r}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


ENGINE_KEYS = ("attention_impl", "max_logprobs", "sparse_prefill", "sparse_min_len", "sparse_tau", "speculative",
               "draft", "spec_depth", "spec_nodes", "spec_top_k", "spec_max_batch")
SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "cluster": ClusterConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxinfer.serve",
        description="Serve a model over gRPC (jaxinfer.v1 + JetStream Orchestrator) and OpenAI-compatible HTTP.")
    parser.add_argument("--config", help="TOML file with settings; flags given here override it")
    for title, cls in (("server", ServeConfig), ("replica groups", ClusterConfig), ("KV cache", CacheConfig),
                       ("scheduler", SchedulerConfig)):
        add_dataclass_arguments(parser.add_argument_group(title), cls)
    engine = parser.add_argument_group("engine")
    engine.add_argument("--attention-impl", default="auto", choices=["auto", "pallas", "reference"],
                        help="attention implementation (auto: Pallas kernel on GPU/TPU, reference on CPU)")
    engine.add_argument("--max-logprobs", type=int, default=20, help="largest top-logprobs count a request may ask")
    sparse = SparsePrefillConfig()
    engine.add_argument("--sparse-prefill", default=sparse.mode, choices=SPARSE_PREFILL_MODES,
                        help="prefill backend for long prompts (UniSparse block-sparse, dense blocked, or off)")
    engine.add_argument("--sparse-min-len", type=int, default=sparse.min_len,
                        help="prompts longer than this many tokens use the sparse prefill backend")
    engine.add_argument("--sparse-tau", type=float, default=sparse.unisparse.tau,
                        help="UniSparse: estimated attention mass each query block keeps")
    add_speculative_arguments(engine)
    return parser


def add_speculative_arguments(group) -> None:
    spec = SpeculativeConfig()
    group.add_argument("--speculative", default=spec.method, choices=list(SPEC_METHODS),
                       help="speculative decoding: ngram (prompt lookup), eagle (draft head, fixed tree), heterospec "
                            "(draft head, entropy-adaptive tree) or off")
    group.add_argument("--draft", default=spec.draft,
                       help="draft head directory for eagle/heterospec (default: the head shipped for the model)")
    group.add_argument("--spec-depth", type=int, default=spec.depth, help="base draft depth (tree levels)")
    group.add_argument("--spec-nodes", type=int, default=spec.num_nodes, help="tree nodes verified per round")
    group.add_argument("--spec-top-k", type=int, default=spec.top_k, help="children per expanded tree node")
    group.add_argument("--spec-max-batch", type=int, default=spec.max_batch,
                       help="speculate only while at most this many requests decode (plain decoding above)")


def speculative_from_args(args) -> SpeculativeConfig:
    return SpeculativeConfig(method=args.speculative, draft=args.draft, depth=args.spec_depth,
                             num_nodes=args.spec_nodes, top_k=args.spec_top_k, max_batch=args.spec_max_batch)


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServeConfig, EngineConfig]:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_read_config_file(Path(pre.config), parser))
    args = parser.parse_args(argv)
    engine = EngineConfig(cache=dataclass_from_args(CacheConfig, args),
                          scheduler=dataclass_from_args(SchedulerConfig, args),
                          attention_impl=args.attention_impl, max_logprobs=args.max_logprobs,
                          sparse_prefill=SparsePrefillConfig(
                              mode=args.sparse_prefill, min_len=args.sparse_min_len,
                              unisparse=dataclasses.replace(UniSparseConfig(), tau=args.sparse_tau)),
                          speculative=speculative_from_args(args))
    serve = dataclasses.replace(dataclass_from_args(ServeConfig, args),
                                cluster=dataclass_from_args(ClusterConfig, args))
    return serve, engine


def _read_config_file(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Flatten a TOML config into argparse defaults, refusing unknown keys."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    known = {"": {f.name for f in dataclasses.fields(ServeConfig)} - {"cluster"}, "engine": set(ENGINE_KEYS)}
    known.update({name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()})
    values: dict[str, Any] = {}
    for key, value in data.items():
        section, items = (key, value) if isinstance(value, dict) else ("", {key: value})
        if section not in known:
            raise ValueError(f"config file {path}: unknown table [{section}] (known: {', '.join(sorted(known)[1:])})")
        for name, item in items.items():
            if name not in known[section]:
                where = f"[{section}]" if section else "the top level"
                raise ValueError(f"config file {path}: unknown key {name!r} in {where}")
            values[name] = tuple(item) if isinstance(item, list) else item
    return values
