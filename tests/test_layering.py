"""The layers of the house import one way, downward (DESIGN.md "Layers"): kernels and the shared
vocabulary (configs, request parameters) at the bottom, then layers/, models/, the engine core
(scheduler, block manager, batches, model runner), spec/ (which hands the runner its steps through
a protocol), the engine loop, replicas/ (engines behind a router) and the front ends. A module may
import its own layer and any below it; an import that runs back up fails here (module-level and
deferred imports alike)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
CORE = ("scheduler", "block_manager", "sequence", "batch", "model_runner", "compile_plan", "sharding",
        "request_output")
LAYERS = [  # bottom first: (name, module prefixes)
    ("kernels and vocabulary", ["pallas_kernels", "jaxinfer.cpu", "jaxinfer.config", "jaxinfer.config_tree",
                                "jaxinfer.sampling_params"]),
    ("layers", ["jaxinfer.layers"]),
    ("models", ["jaxinfer.models"]),
    ("engine core", [f"jaxinfer.engine.{name}" for name in CORE]),
    ("spec", ["jaxinfer.spec"]),
    ("engine loop", ["jaxinfer.engine.engine", "jaxinfer.engine.async_engine", "jaxinfer.engine.migration_port",
                     "jaxinfer.engine.client"]),
    ("replica groups", ["jaxinfer.replicas"]),
    ("front ends", ["jaxinfer.serve", "jaxinfer.llm", "jaxinfer.generate", "jaxinfer.bench"]),
]


def _rank(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _modules():
    for package in ("jaxinfer", "pallas_kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)  # from package import module


def test_every_import_points_down():
    upward = []
    for module, path in _modules():
        rank = _rank(module)
        if rank is None:
            continue
        for target in set(_imports(path)):
            target_rank = _rank(target)
            if target_rank is not None and target_rank > rank:
                upward.append(f"{module} ({LAYERS[rank][0]}) imports {target} ({LAYERS[target_rank][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_the_layer_map_names_real_modules():
    names = {module for module, _ in _modules()}
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(n == prefix or n.startswith(prefix + ".") for n in names), prefix
