"""A tiny model written as a real GGUF (with a BPE tokenizer and chat template) and a server running in
a background thread with its own event loop, so tests talk to it with ordinary sync clients."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.loader import load_model
from jaxinfer.serve.config import ServeConfig
from jaxinfer.serve.server import Server
from tests.conftest import REPO, tiny_config
from tests.loader import tiny_files
from tests.models import numpy_llama

MAX_MODEL_LEN = 256
# bursts of 2 decode steps: the tiny model decodes so fast that with 4-token pages longer bursts finish
# requests before the live migrations of the cluster tests (a page of pre-copy per round) catch them
SCHEDULER = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_prefill_seqs=4, decode_buckets=(8,),
                            prefill_buckets=(32,), kv_buckets=(64, 256), decode_steps=2)
ENGINE = EngineConfig(cache=CacheConfig(page_size=4, num_pages=512), scheduler=SCHEDULER, max_logprobs=5)
CONFIG_TOML = """
[cache]
page_size = 4
num_pages = 512
[scheduler]
max_num_seqs = 8
max_num_batched_tokens = 32
max_prefill_seqs = 4
decode_buckets = [8]
prefill_buckets = [32]
kv_buckets = [64, 256]
decode_steps = 2
[engine]
max_logprobs = 5
"""


def write_tiny_gguf(path: Path) -> Path:
    cfg = tiny_config(vocab_size=len(tiny_files.vocab_tokens()), max_position=MAX_MODEL_LEN)
    tiny_files.write_gguf(path, cfg, numpy_llama.random_tensors(cfg, seed=3))
    return path


@functools.cache
def tiny_model(path: str):
    return load_model(path, "float32")


def offline_engine(path: str, engine_config: EngineConfig = ENGINE) -> Engine:
    loaded = tiny_model(path)
    return Engine(loaded.model, loaded.tokenizer, engine_config)


class ServerThread:
    """``Server`` on its own event loop thread; ``call(coro)`` runs a coroutine there. The constructor
    returns once the server is ready, or with ``wait_ready=False`` once it listens (``starting`` is the
    start-up's future)."""

    def __init__(self, model_path: str, engine_config: EngineConfig = ENGINE, loaded=None, *, wait_ready=True,
                 **serve):
        serve.setdefault("served_model_name", "tiny")
        config = ServeConfig(model=model_path, grpc_port=0, http_port=0, **serve)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        loaded = loaded or tiny_model(model_path)
        self.server = Server(config, engine_config, loaded=loaded, progress=lambda message: None)
        self.starting = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        if wait_ready:
            self.starting.result(300)
        else:
            self.call(self.server.listening.wait(), timeout=60)
        self.http = f"http://127.0.0.1:{self.server.http_port}"
        self.grpc = f"127.0.0.1:{self.server.grpc_port}"

    @property
    def frontend(self):
        return self.server.frontend

    @property
    def engine(self) -> Engine:
        return self.server.async_engine.engine

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, drain_timeout: float = 5.0) -> None:
        try:
            self.call(self.server.stop(drain_timeout), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def pages_in_use(server: ServerThread) -> int:
    return server.engine.block_manager.num_used


def run_client_script(source: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a Python client in a fresh interpreter (protobuf stubs that cannot share our process)."""
    return subprocess.run([sys.executable, "-c", source, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def replace_scheduler(**changes) -> EngineConfig:
    return dataclasses.replace(ENGINE, scheduler=dataclasses.replace(SCHEDULER, **changes))


READY = re.compile(r"jaxinfer ready: .* gRPC (\S+):(\d+) \| HTTP (\S+)")


class ServeProcess:
    """``python -m jaxinfer.serve`` in a subprocess; the constructor returns once it prints its ready line."""

    def __init__(self, model: str, tmp_path: Path, *flags: str, config_text: str = CONFIG_TOML):
        config = tmp_path / "serve.toml"
        config.write_text(config_text)
        cmd = [sys.executable, "-m", "jaxinfer.serve", "--model", model, "--config", str(config),
               "--grpc-port", "0", "--http-port", "0", *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.grpc, self.http = f"{match[1]}:{match[2]}", match[3]
                break
        else:
            raise AssertionError("server exited before it was ready:\n" + "".join(self.lines))
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def finish(self, sig=signal.SIGTERM, timeout=60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code
