"""The KV transports of live migrations between processes: what the destination gets is the source's
pages bit for bit (bf16 and f32), through host arrays or jax.experimental.transfer (two transfer
servers in this process, on the loopback address)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.replicas.transport import HostTransport, JaxTransport, Ticket, make_transport


def pages(dtype):
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((2, 6, 4, 8)), dtype)
    return k, jnp.asarray(rng.standard_normal((2, 6, 4, 8)), dtype) * 3


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_host_transport_is_bit_exact(dtype):
    payload = pages(dtype)
    sent = HostTransport().send(payload)
    assert all(isinstance(x, np.ndarray) for x in sent)  # host arrays: what Ray's object store carries
    got = HostTransport().fetch(sent, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    assert all(same_bits(x, y) for x, y in zip(got, payload, strict=True))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_jax_transfer_is_bit_exact_and_sends_only_a_ticket(dtype):
    source, destination = JaxTransport("127.0.0.1"), JaxTransport("127.0.0.1")
    payload = pages(dtype)
    ticket = source.send(payload, hold_seconds=30)
    assert isinstance(ticket, Ticket) and ticket.address.startswith("127.0.0.1:")
    assert ticket.dtypes == (jnp.dtype(dtype).name,) * 2
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = destination.fetch(ticket, sharding)
    assert all(same_bits(x, y) for x, y in zip(got, payload, strict=True))
    assert all(x.sharding == sharding for x in got)
    assert source.send(payload).uuid != ticket.uuid  # every offer its own id


def test_transports_by_name():
    assert make_transport("host").name == "host" and make_transport("jax").name == "jax"
    assert HostTransport().send(None) is None and JaxTransport().send(None) is None
    with pytest.raises(ValueError, match="KV transport must be one of host, jax"):
        make_transport("rdma")
