"""How a live migration's KV pages travel between replicas in different processes: the source turns
its exported pages into something that can be sent (``send``), the destination turns that back into
arrays on its own devices (``fetch``). The control path (which pages, when) is the migration's own
(jaxinfer.replicas.migration); only the bytes go here.

- ``host`` (default): the pages as host arrays. A Ray replica returns them from its actor method,
  so they sit in its node's object store and the destination's raylet pulls them from there.
- ``jax``: ``jax.experimental.transfer``, device to device: the source offers the arrays on its
  transfer server under a random 63-bit id for ``hold_seconds`` (then the offer lapses), and only
  a small ticket travels; the destination pulls them straight onto its devices. The server
  listens on the node's address given at construction.
"""

from __future__ import annotations

import dataclasses
import datetime
import secrets
import threading

import jax
import jax.numpy as jnp

TRANSPORTS = ("host", "jax")


@dataclasses.dataclass(frozen=True)
class Ticket:
    """Arrays offered on a transfer server: where, under which id, and their shapes and dtypes."""

    address: str
    uuid: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]


class HostTransport:
    name = "host"

    def send(self, payload, hold_seconds: float | None = None):
        return None if payload is None else jax.device_get(payload)

    def fetch(self, sent, sharding: jax.sharding.Sharding):
        return sent  # the import step copies host arrays onto the pool's devices


class JaxTransport:
    """``jax.experimental.transfer`` between replicas (one server per process, started on first use)."""

    name = "jax"

    def __init__(self, host: str = "127.0.0.1", hold_seconds: float = 120.0):
        self.host, self.hold_seconds = host, hold_seconds
        self._server = None
        self._connections: dict[str, object] = {}
        self._lock = threading.Lock()  # fetches run on worker threads

    def _start(self):
        with self._lock:
            if self._server is None:
                from jax.experimental import transfer

                self._server = transfer.start_transfer_server(jax.devices()[0].client, f"{self.host}:0",
                                                              transport_addresses=[f"{self.host}:0"])
            return self._server

    @property
    def address(self) -> str:
        return self._start().address()

    def send(self, payload, hold_seconds: float | None = None) -> Ticket | None:
        """Offer the payload's arrays (on this process's devices) for one pull within the hold."""
        if payload is None:
            return None
        arrays = jax.tree.leaves(payload)
        uuid = secrets.randbits(63)
        until = datetime.datetime.now() + datetime.timedelta(seconds=hold_seconds or self.hold_seconds)
        self._start().await_pull(uuid, arrays, timeout=until)
        return Ticket(self.address, uuid, tuple(tuple(a.shape) for a in arrays), tuple(str(a.dtype) for a in arrays))

    def fetch(self, ticket: Ticket | None, sharding: jax.sharding.Sharding):
        """Pull a ticket's arrays onto ``sharding`` (blocking: call it off the event loop)."""
        if ticket is None:
            return None
        server = self._start()
        with self._lock:
            connection = self._connections.get(ticket.address)
            if connection is None:
                connection = self._connections[ticket.address] = server.connect(ticket.address)
        specs = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
                 for shape, dtype in zip(ticket.shapes, ticket.dtypes, strict=True)]
        return tuple(connection.pull(ticket.uuid, specs))


def make_transport(name: str, host: str = "127.0.0.1"):
    if name not in TRANSPORTS:
        raise ValueError(f"KV transport must be one of {', '.join(TRANSPORTS)}, got {name!r}")
    return JaxTransport(host) if name == "jax" else HostTransport()
