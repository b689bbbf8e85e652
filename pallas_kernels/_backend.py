"""Resolution of kernel dispatch: Pallas or reference, interpret mode or compiled.

Resolved once (when a model runner is built) and passed down as static configuration; model code
never inspects devices itself.
"""

from __future__ import annotations

import os

import jax

IMPLS = ("auto", "pallas", "reference")


def resolve_interpret(interpret: bool | None = None) -> bool:
    """Interpret mode when asked, else from JAXINFER_PALLAS_INTERPRET=0/1, else on CPU only."""
    if interpret is not None:
        return bool(interpret)
    env = os.environ.get("JAXINFER_PALLAS_INTERPRET")
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"JAXINFER_PALLAS_INTERPRET must be 0 or 1, got {env!r}")
        return env == "1"
    return jax.default_backend() == "cpu"


def resolve_impl(impl: str = "auto") -> str:
    """'auto' -> 'pallas' on GPU/TPU and 'reference' on CPU (interpret mode is for tests, not speed)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r} (choose from {', '.join(IMPLS)})")
    if impl != "auto":
        return impl
    return "reference" if jax.default_backend() == "cpu" else "pallas"
