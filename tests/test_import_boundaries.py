"""Host-only modules (DESIGN.md principle 4: host plans, device computes) load without jax: the
configs, the scheduler and block manager, the request vocabulary and the speculative tree policy.
(The router has its own, stricter test: tests/router/test_imports.py.)"""

import subprocess
import sys
from pathlib import Path

import pytest

HOST_ONLY = ("jaxinfer.config", "jaxinfer.buckets", "jaxinfer.sampling_params", "jaxinfer.engine.sequence",
             "jaxinfer.engine.block_manager", "jaxinfer.engine.scheduler", "jaxinfer.spec.tree",
             "jaxinfer.spec.policy", "jaxinfer.datasets")


@pytest.mark.parametrize("module", HOST_ONLY)
def test_host_only_module_loads_without_jax(module):
    code = (f"import sys, {module}; loaded = [m for m in ('jax', 'jaxlib', 'flax', 'pallas_kernels') "
            "if m in sys.modules]; assert not loaded, f'{loaded} imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]


def test_buckets():
    from jaxinfer.buckets import bucket, geometric

    assert geometric(1, 2, 12) == (1, 2, 4, 8, 12) and geometric(256, 4, 256) == (256,)
    assert [bucket(n, (1, 2, 4, 8, 12)) for n in (0, 1, 3, 8, 9, 12)] == [1, 1, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="13 exceeds the largest bucket 12"):
        bucket(13, (1, 2, 4, 8, 12))
