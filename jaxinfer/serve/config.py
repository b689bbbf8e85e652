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
    [speculative]                   # SpeculativeConfig: method = "ngram", num_nodes = 8, ...
    [sparse_prefill.unisparse]      # UniSparseConfig: tau = 0.9, ...

Top-level keys are ServeConfig's and EngineConfig's own fields (``max_logprobs = 5``); an
``[engine]`` table is another name for the top level. The flags and keys are generated from the
config dataclasses (jaxinfer.config_tree): every field is reachable as ``--path.to-field`` (bare
``--field-name`` for the server, cluster, cache and scheduler fields) and as a key of its table, and
the shorter flags a field's metadata names (``--speculative``, ``--spec-nodes``, ``--sparse-tau``)
also work as top-level keys. ``python -m jaxinfer.serve --help`` lists them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxinfer import config_tree
from jaxinfer.cli import ArgumentParser
from jaxinfer.config import DEFAULT_MODEL, DTYPE_HELP, WEIGHT_DTYPES, EngineConfig, SpeculativeConfig
from jaxinfer.replicas.transport import TRANSPORTS
from jaxinfer.router.base import MIGRATION_MODES
from jaxinfer.router.baselines import ROUTERS

SAMPLING_DEFAULTS = ("model", "api")
RUNTIMES = ("local", "ray")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Replica groups on this host and the router in front of them (CascadeInfer)."""

    replicas: str = dataclasses.field(default="1", metadata={
        "help": "replica groups: N (the devices split N ways) or NxD (N groups of D devices); on CPU set "
                "XLA_FLAGS=--xla_force_host_platform_device_count to get several devices"})
    router: str = dataclasses.field(default="cascade", metadata={
        "help": "how requests are placed and moved", "choices": ROUTERS})
    migration: str = dataclasses.field(default="auto", metadata={
        "help": "how a request moves between replicas: live (KV copy), recompute, auto (cheaper by the cost model)",
        "choices": MIGRATION_MODES})
    runtime: str = dataclasses.field(default="local", metadata={
        "help": "where the replica groups run: local (engines in this process, on its devices) or ray (one Ray "
                "actor per group, on the nodes of a Ray cluster; needs the jaxinfer[cluster] extra)",
        "choices": RUNTIMES, "flag": "cluster"})
    ray_address: str = dataclasses.field(default="", metadata={
        "help": "with --cluster ray: the Ray cluster to join (host:port of its head, or 'auto'); empty starts a "
                "Ray instance on this machine"})
    kv_transport: str = dataclasses.field(default="host", metadata={
        "help": "with --cluster ray: how a live migration's KV pages travel between replicas: host (host arrays "
                "through Ray's object store) or jax (jax.experimental.transfer, device to device)",
        "choices": TRANSPORTS})
    cost_model: str = dataclasses.field(default="", metadata={
        "help": "step-time profile from launch/profile_cost_model.py (empty: $JAXINFER_CACHE/cost_model.json, "
                "else the CPU profile shipped in profiling/results)"})

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.migration not in MIGRATION_MODES:
            raise ValueError(f"migration must be one of {', '.join(MIGRATION_MODES)}, got {self.migration!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"cluster runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.ray_address and self.runtime != "ray":
            raise ValueError("ray_address is for --cluster ray")
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {', '.join(TRANSPORTS)}, got {self.kv_transport!r}")
        if self.kv_transport != "host" and self.runtime != "ray":
            raise ValueError("kv_transport is for --cluster ray (replicas in this process copy device to device)")
        parts = self.replicas.lower().split("x")
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"replicas must look like 4 or 4x2 (groups x devices each), got {self.replicas!r}")

    @property
    def enabled(self) -> bool:
        return self.replicas != "1" or self.router != "cascade" or self.runtime != "local"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """The server: what it loads, where it listens, how it shuts down."""

    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata={
        "help": "embedded model name, .gguf file, Hugging Face directory or jaxinfer checkpoint"})
    dtype: str = dataclasses.field(default="auto", metadata={"help": DTYPE_HELP, "choices": WEIGHT_DTYPES})
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
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.dtype!r}")
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


FLAT = ((), ("cluster",), ("cache",), ("scheduler",))  # sections whose flags are bare field names
TITLES = {(): "server and engine", ("cluster",): "replica groups", ("cache",): "KV cache", ("scheduler",): "scheduler",
          ("speculative",): "speculative decoding", ("sparse_prefill",): "sparse prefill",
          ("sparse_prefill", "unisparse"): "UniSparse"}


def serve_settings() -> list[config_tree.Setting]:
    """Every setting of the server: ServeConfig's tree, then EngineConfig's (one top level)."""
    return config_tree.settings(ServeConfig) + config_tree.settings(EngineConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m jaxinfer.serve",
        description="Serve a model over gRPC (jaxinfer.v1 + JetStream Orchestrator) and OpenAI-compatible HTTP.")
    parser.add_argument("--config", help="TOML file with settings; flags given here override it")
    config_tree.add_arguments(parser, serve_settings(), flat=FLAT, group_titles=TITLES)
    return parser


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    """The speculative decoding flags alone (for entry points without the rest of the tree)."""
    config_tree.add_arguments(parser, config_tree.settings(SpeculativeConfig, ("speculative",)),
                              group_titles=TITLES)


def speculative_from_args(args: argparse.Namespace) -> SpeculativeConfig:
    values = config_tree.values_from_args(args, config_tree.settings(SpeculativeConfig, ("speculative",)))
    return config_tree.build(SpeculativeConfig, values, ("speculative",))


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServeConfig, EngineConfig]:
    """Flags over the --config file over the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tree = serve_settings()
    values = {}
    if args.config:
        path = Path(args.config)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
        values = config_tree.values_from_toml(data, tree, str(path), root_table="engine")
    values.update(config_tree.values_from_args(args, tree))
    return config_tree.build(ServeConfig, values), config_tree.build(EngineConfig, values)
