"""The server's lifecycle: load the model, warm up, serve gRPC and HTTP from one event loop, and shut
down gracefully (stop accepting, let in-flight requests finish within the drain timeout, cancel the
rest, stop the listeners and the engine)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import uvicorn

from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import EngineConfig
from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.engine.engine import Engine
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.loader.embedded import cache_dir
from jaxinfer.loader.sampling_defaults import describe
from jaxinfer.replicas.cluster import Cluster
from jaxinfer.replicas.placement import parse_mesh_spec, replica_meshes
from jaxinfer.router.baselines import make_router
from jaxinfer.router.cost_model import CostModel
from jaxinfer.serve.config import ServeConfig
from jaxinfer.serve.frontend import Frontend
from jaxinfer.serve.grpc_api import GrpcServer
from jaxinfer.serve.http_api import HttpApi
from jaxinfer.serve.profiler import TraceCapture
from jaxinfer.spec.draft_head import prepare_speculative

logger = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Server decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve {what} on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _progress_reporter(say: Callable[[str], None], prefix: str) -> Callable[[int, int], None]:
    """A warm-up progress callback that reports at most every 5 s (and at the end)."""
    start, last = time.perf_counter(), [0.0]

    def report(done: int, total: int) -> None:
        if done == total or time.perf_counter() - last[0] > 5:
            last[0] = time.perf_counter()
            say(f"{prefix}compiling step shapes: {done}/{total} ({time.perf_counter() - start:.0f} s)")
    return report


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


SHIPPED_COST_MODEL = Path(__file__).resolve().parent.parent / "router" / "profiles" / "cpu-smollm2-135m.json"


def ray_runtime():
    """jaxinfer.replicas.ray_replica, imported only here (default serving never imports ray); without
    Ray installed, an error naming the extra."""
    try:
        from jaxinfer.replicas import ray_replica
    except ModuleNotFoundError as exc:
        if exc.name != "ray" and not (exc.name or "").startswith("ray."):
            raise
        raise RuntimeError("--cluster ray needs Ray, which is not installed: pip install 'jaxinfer[cluster]'") from None
    return ray_replica


def ray_replica_engine(model: str, dtype: str, engine_config: EngineConfig) -> tuple[Engine, dict]:
    """A replica's engine, built inside its Ray actor (the model loaded there), and what the serving
    process needs from the load."""
    enable_compilation_cache()
    loaded = load_model(model, dtype)
    speculative, draft_head = prepare_speculative(engine_config.speculative, model)
    engine = Engine(loaded.model, loaded.tokenizer, dataclasses.replace(engine_config, speculative=speculative),
                    draft_head=draft_head)
    return engine, {"sampling_defaults": loaded.sampling_defaults}


def load_cost_model(path: str, say: Callable[[str], None]) -> CostModel:
    """The router's step-time profile: ``path``, else $JAXINFER_CACHE/cost_model.json (written by
    launch/profile_cost_model.py), else the CPU profile shipped with jaxinfer."""
    if path:
        return CostModel.load(path)
    for candidate in (cache_dir() / "cost_model.json", SHIPPED_COST_MODEL):
        if candidate.is_file():
            model = CostModel.load(candidate)
            say(f"router cost model: {candidate} ({model.hardware}, {model.date}); profile this machine with "
                "launch/profile_cost_model.py for a better plan")
            return model
    raise FileNotFoundError("no router cost model found: run launch/profile_cost_model.py --out "
                            f"{cache_dir() / 'cost_model.json'}")


class Server:
    """``await start()`` loads, warms up and binds; ``await stop()`` shuts down gracefully."""

    def __init__(self, config: ServeConfig, engine_config: EngineConfig | None = None, *,
                 loaded: LoadedModel | None = None, progress: Callable[[str], None] = _print_progress):
        self.config = config
        self.engine_config = engine_config or EngineConfig()
        self._loaded = loaded
        self._progress = progress
        self._links: dict[tuple[int, int], float] | None = None  # measured bytes/s between Ray replicas
        self.async_engine: AsyncEngine | None = None
        self.frontend: Frontend | None = None
        self.grpc: GrpcServer | None = None
        self.http: _Uvicorn | None = None
        self.http_port = 0
        self._http_task: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.listening = asyncio.Event()
        self._sampling_defaults: dict = {}

    @property
    def grpc_port(self) -> int:
        return self.grpc.port if self.grpc else 0

    async def start(self) -> None:
        """Listen at once (health NOT_SERVING, requests refused as warming up), then load and warm up
        the engines on a thread and serve; returns when serving. ``listening`` is set once the ports
        answer."""
        config = self.config
        if config.cluster.runtime == "ray":
            ray_runtime()  # before anything starts: a missing extra is one line
        http_socket = _bind(config.host, config.http_port, "HTTP")
        if config.grpc_port:
            _bind(config.host, config.grpc_port, "gRPC").close()
        self.frontend = Frontend(config.model_name, config.drain_timeout)
        try:
            self.grpc = GrpcServer(self.frontend, TraceCapture(), config.host, config.grpc_port,
                                   config.max_request_bytes)
            await self.grpc.start()
            await self._start_http(http_socket)
        except BaseException:
            http_socket.close()
            if self.grpc is not None:
                await self.grpc.stop(0)
            raise
        self.listening.set()
        self._progress(f"listening while warming up: gRPC {config.host}:{self.grpc_port} | "
                       f"HTTP http://{config.host}:{self.http_port} (health: NOT_SERVING / 503 until ready)")
        try:
            if config.profiler_port:
                jax.profiler.start_server(config.profiler_port)
                self._progress(f"jax profiler server on port {config.profiler_port} (XProf: capture from "
                               f"localhost:{config.profiler_port})")
            engines = await asyncio.to_thread(self._build_engines)
            self.async_engine = self._front(engines)
        except BaseException:
            await self._close_listeners()
            if self.async_engine is not None:
                self.async_engine.shutdown()
            raise
        self.frontend.attach(self.async_engine, self._sampling_defaults)
        if self.frontend.accepting:  # a Drain during warm-up keeps it NOT_SERVING
            await self.grpc.set_serving(True)
        self._watcher = asyncio.create_task(self._watch())
        self._progress(f"jaxinfer ready: model {config.model_name} | gRPC {config.host}:{self.grpc_port} | "
                       f"HTTP http://{config.host}:{self.http_port}")

    async def _start_http(self, sock: socket.socket) -> None:
        api = HttpApi(self.frontend, self.config.max_request_bytes, self.config.max_prompts_per_request)
        self.http = _Uvicorn(uvicorn.Config(api.app, log_level="warning", access_log=False,
                                            timeout_graceful_shutdown=5, lifespan="off"))
        self.http_port = sock.getsockname()[1]
        self._http_task = asyncio.create_task(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if self._http_task.done():
                self._http_task.result()  # raises why uvicorn could not start
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    def _say(self, message: str) -> None:
        """Report start-up progress, and answer it to requests refused while warming up."""
        self._progress(message)
        if self.frontend is not None:
            self.frontend.warming = message

    def _front(self, engines: list) -> AsyncEngine | Cluster:
        """One engine: its AsyncEngine; replica groups (engines here, or Ray replicas): a Cluster
        behind the configured router."""
        cluster = self.config.cluster
        if not cluster.enabled:
            return AsyncEngine(engines[0])
        if cluster.runtime == "ray":
            pages = engines[0].metrics.kv_pages_total
            page_size, max_len = engines[0].page_size, engines[0].info.max_model_len
        else:
            pages, page_size = engines[0].block_manager.num_pages, engines[0].block_manager.page_size
            max_len = engines[0].scheduler_config.max_model_len
        cost_model = load_cost_model(cluster.cost_model, self._progress).with_capacity(pages * page_size)
        # a live cluster chooses re-plans off its router loop (the cascade simulates candidate plans)
        kw = {"background": True} if cluster.router == "cascade" else {}
        router = make_router(cluster.router, len(engines), cost_model, max_len, **kw)
        where = "Ray actors" if cluster.runtime == "ray" else "replica groups"
        self._progress(f"{len(engines)} {where}, router {cluster.router}, migration {cluster.migration}")
        return Cluster(engines, router, migration=cluster.migration, cost_model=cost_model, links=self._links)

    def _start_ray_replicas(self) -> list:
        """One Ray actor per replica group, each loading the model itself; this process loads nothing."""
        config, say = self.config, self._say
        runtime = ray_runtime()
        parts = [int(p) for p in config.cluster.replicas.lower().split("x")]  # checked by ClusterConfig
        replicas, per = parts[0], parts[1] if len(parts) == 2 else 1
        say(f"joining Ray ({config.cluster.ray_address or 'a new local instance'}) ...")
        resources = runtime.connect(config.cluster.ray_address or None)
        say(f"starting {replicas} replica actors ({config.model}) on {resources}")
        make_engine = functools.partial(ray_replica_engine, config.model, config.dtype, self.engine_config)
        started = runtime.start_replicas(make_engine, replicas, warm_up=config.warm_up,
                                         options=[runtime.actor_options(per)] * replicas,
                                         transport=config.cluster.kv_transport)
        if config.sampling_defaults == "model":
            self._sampling_defaults = started[0].facts.get("sampling_defaults", {})
        say(f"{replicas} replica actors on nodes {', '.join(sorted({r.facts['node_id'][:8] for r in started}))}")
        if replicas > 1:
            self._links = runtime.measure_links(started)
            rates = sorted(self._links.values())
            say(f"links between replicas: {rates[0] / 1e9:.2f}-{rates[-1] / 1e9:.2f} GB/s (each pair measured)")
        return started

    def _build_engines(self) -> list:
        config, say = self.config, self._say
        if config.cluster.runtime == "ray":
            return self._start_ray_replicas()
        enable_compilation_cache()
        loaded = self._loaded
        if loaded is None:
            say(f"loading {config.model} ({config.dtype}) ...")
            start = time.perf_counter()
            loaded = load_model(config.model, config.dtype)
            say(f"loaded weights in {time.perf_counter() - start:.1f} s")
        if config.sampling_defaults == "model":
            self._sampling_defaults = loaded.sampling_defaults
            say(f"sampling defaults of the model: {describe(loaded.sampling_defaults)} (unset fields: OpenAI "
                "temperature 1.0, gRPC greedy)")
        speculative, draft_head = prepare_speculative(self.engine_config.speculative, config.model)
        engine_config = dataclasses.replace(self.engine_config, speculative=speculative)
        meshes = [None]
        if config.cluster.enabled:
            replicas, per = parse_mesh_spec(config.cluster.replicas, len(jax.local_devices()))
            meshes = replica_meshes(replicas, jax.local_devices()[:replicas * per])
        engines = [Engine(loaded.model, loaded.tokenizer, engine_config, draft_head=draft_head, mesh=mesh)
                   for mesh in meshes]
        if config.warm_up:
            for index, engine in enumerate(engines):
                name = f"replica {index}: " if len(engines) > 1 else ""

                def done(count: int, seconds: float, name: str = name) -> None:
                    say(f"{name}compiled the other {count} step shapes and samplers in {seconds:.0f} s (while serving)")
                engine.warm_up(_progress_reporter(say, name), background=config.background_compile, on_done=done,
                               migration=len(engines) > 1)
        return engines

    async def _watch(self) -> None:
        """Every second: sample the tokens/s gauges; report NOT_SERVING once the engine has died."""
        reported_dead = False
        while True:
            self.frontend.metrics.sample()
            if not self.async_engine.alive and not reported_dead:
                reported_dead = True
                logger.error("engine stopped; health is now NOT_SERVING")
                await self.grpc.set_serving(False)
            await asyncio.sleep(1.0)

    async def _close_listeners(self) -> None:
        if self.http is not None:
            self.http.should_exit = True
            if self._http_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._http_task, 10)
        if self.grpc is not None:
            await self.grpc.stop(1.0)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, drain (finish or cancel in-flight requests), close listeners and engine."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        try:
            if self.frontend is not None:
                if self.grpc is not None:
                    await self.grpc.set_serving(False)
                in_flight = self.frontend.num_in_flight
                if in_flight:
                    self._progress(f"draining {in_flight} requests (up to {timeout:.0f} s)")
                finished, cancelled, _ = await self.frontend.drain(timeout, cancel_remaining=True)
                if in_flight:
                    self._progress(f"drained: {finished} finished, {cancelled} cancelled")
            await self._close_listeners()
            if self._watcher is not None:
                self._watcher.cancel()
            if self.async_engine is not None:
                await asyncio.to_thread(self.async_engine.shutdown)
            if self.config.cluster.runtime == "ray":
                ray_runtime().disconnect()
        finally:
            self._stopped.set()
