"""The router package stays pure Python + numpy: no jax, not even through the engine or config (it reads
traces through jaxinfer.datasets, a stdlib-only leaf)."""

import ast
import sys
from pathlib import Path

import jaxinfer.router

ALLOWED = {"numpy", "jaxinfer"} | set(sys.stdlib_module_names)
LEAVES = ("jaxinfer.router", "jaxinfer.datasets")  # jaxinfer modules the router may use: no jax below them


def test_router_modules_import_no_jax():
    package = Path(jaxinfer.router.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in ALLOWED, f"{path.name} imports {name}"
                if name.startswith("jaxinfer"):
                    assert name.startswith(LEAVES), f"{path.name} imports {name}"


def test_router_loads_without_jax():
    import subprocess

    code = ("import sys; import jaxinfer.router.cascade, jaxinfer.router.sim, jaxinfer.router.baselines, "
            "jaxinfer.router.trace; assert 'jax' not in sys.modules, 'jax was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(jaxinfer.router.__file__).parents[2])
    assert result.returncode == 0, result.stderr
