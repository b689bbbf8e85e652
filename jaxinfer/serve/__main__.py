"""``python -m jaxinfer.serve``: serve a model over gRPC and OpenAI-compatible HTTP until SIGTERM/SIGINT,
then drain in-flight requests (up to --drain-timeout seconds) and exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from jaxinfer.cli import run_main
from jaxinfer.serve.config import parse_args
from jaxinfer.serve.server import Server


async def serve(argv: Sequence[str] | None) -> None:
    config, engine_config = parse_args(argv)
    server = Server(config, engine_config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    start = asyncio.create_task(server.start())
    waiter = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():  # a signal during load or warm-up: nothing is being served yet
        print("stopped before serving", file=sys.stderr, flush=True)
        os._exit(0)  # the load/warm-up thread cannot be interrupted and nothing is served yet
    start.result()
    await waiter
    print("shutting down: no new requests", file=sys.stderr, flush=True)
    await server.stop()
    print("stopped", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(argv))
    return 0


if __name__ == "__main__":
    run_main(main)
