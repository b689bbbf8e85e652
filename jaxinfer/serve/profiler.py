"""XProf traces of the running server: one capture at a time, for a bounded duration."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jax

MAX_CAPTURE_MS = 600_000


class ProfileBusyError(RuntimeError):
    """Another capture is running."""


class TraceCapture:
    def __init__(self) -> None:
        self._busy = False

    async def capture(self, log_dir: str, duration_ms: int) -> float:
        """Trace the whole process (engine thread included) for ``duration_ms`` into ``log_dir``
        (viewable with XProf or TensorBoard's profile plugin); returns the seconds captured."""
        if not isinstance(duration_ms, int) or not 1 <= duration_ms <= MAX_CAPTURE_MS:
            raise ValueError(f"duration_ms must be in [1, {MAX_CAPTURE_MS}], got {duration_ms!r}")
        if not log_dir:
            raise ValueError("log_dir is required")
        if self._busy:
            raise ProfileBusyError("a profile capture is already running")
        self._busy = True
        try:
            try:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"cannot create log_dir {log_dir!r}: {exc.strerror}") from None
            start = time.perf_counter()
            try:
                jax.profiler.start_trace(log_dir)
            except RuntimeError as exc:  # e.g. a live XProf session is tracing through --profiler-port
                raise ProfileBusyError(f"cannot start a trace: {exc}") from None
            try:
                await asyncio.sleep(duration_ms / 1000)
            finally:
                await asyncio.to_thread(jax.profiler.stop_trace)
            return time.perf_counter() - start
        finally:
            self._busy = False
