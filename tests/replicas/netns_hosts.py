"""Three "hosts" on one machine, each its own network namespace with its own address, joined by a
bridge in a namespace of their own (nothing can leave it): a Ray head and two workers started with
``ray start`` (one per host, token auth), one tiny-model replica per host, served from the head's
host. While 60 greedy streams run on the two worker hosts, one host's link is taken down and the
other host's raylet is killed by its pid (its worker, still connected to the serving process,
finishes what it had before it exits; the cut-off host's requests resume on the head host). Every
stream must finish with the reference tokens within the time limit; everything started is stopped.

Needs root (or user and mount namespaces). Run it bare: it enters its own namespaces first.

    python tests/replicas/netns_hosts.py [--timeout 300]

Prints one JSON line: tokens per stream, the reference, the failover counters and the seconds each
phase took.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOSTS = 3
SUBNET = "10.77.0"
STREAMS = 60  # 30 per worker host (4 run at once): each host still has some when it goes
MARK = "NETNS-HOSTS "  # the driver's result line (Ray writes its own lines to stdout too)


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def in_host(index: int, *args: str) -> list[str]:
    return ["ip", "netns", "exec", f"h{index}", *args]


def build_network() -> None:
    """A bridge and three namespaces h0..h2 at SUBNET.1-3, inside this process's own namespaces."""
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "link", "set", "br0", "up")
    for i in range(HOSTS):
        sh("ip", "netns", "add", f"h{i}")
        sh("ip", "link", "add", f"veth{i}", "type", "veth", "peer", "name", "eth0", "netns", f"h{i}")
        sh("ip", "link", "set", f"veth{i}", "master", "br0")
        sh("ip", "link", "set", f"veth{i}", "up")
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"]):
            sh(*in_host(i, *command))


def raylet_pid(index: int) -> int:
    """The raylet of host ``index`` (by the processes in its namespace)."""
    for pid in sh("ip", "netns", "pids", f"h{index}").stdout.split():
        try:
            if "raylet" in Path(f"/proc/{pid}/comm").read_text():
                return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"no raylet on host h{index}")


def start_ray(env: dict, temp: str) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    head = f"{SUBNET}.1"
    sh(*in_host(0, ray, "start", "--head", "--node-ip-address", head, "--port", "6379", "--num-cpus", "0",
                "--resources", '{"host0": 1}', "--object-store-memory", str(80 << 20), "--temp-dir", temp,
                "--include-dashboard", "false", "--disable-usage-stats"), env=env)
    for i in range(1, HOSTS):
        sh(*in_host(i, ray, "start", "--address", f"{head}:6379", "--node-ip-address", f"{SUBNET}.{i + 1}",
                    "--num-cpus", "1", "--resources", json.dumps({f"host{i}": 1}), "--object-store-memory",
                    str(80 << 20), "--disable-usage-stats"), env=env)


def stop_ray(env: dict) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    for i in range(HOSTS):
        sh(*in_host(i, ray, "stop", "--force"), check=False, env=env, timeout=60)


def outer(timeout: float) -> int:
    """Enter new network and mount namespaces and run the scenario there, bounded."""
    if os.environ.get("JAXINFER_NETNS_HOSTS") == "1":
        return inner(timeout)
    command = ["unshare", "-n", "-m", "--propagation", "private", sys.executable, __file__, "--timeout", str(timeout)]
    try:
        return subprocess.run(command, env={**os.environ, "JAXINFER_NETNS_HOSTS": "1"}, timeout=timeout + 60).returncode
    except subprocess.TimeoutExpired:
        print("netns hosts: timed out", file=sys.stderr)
        return 124


def inner(timeout: float) -> int:
    work = tempfile.mkdtemp(prefix="ji-netns-")
    token = Path(work, "token")
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONPATH": str(REPO),
           "JAX_PLATFORMS": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    os.makedirs("/run/netns", exist_ok=True)
    sh("mount", "-t", "tmpfs", "tmpfs", "/run/netns")  # private to this mount namespace
    started = time.perf_counter()
    try:
        build_network()
        start_ray(env, os.path.join(work, "ray"))
        driver = subprocess.run(in_host(0, sys.executable, __file__, "--drive"), env=env, capture_output=True,
                                text=True, timeout=max(timeout - (time.perf_counter() - started), 30))
        sys.stderr.write(driver.stderr[-4000:])
        if driver.returncode != 0:
            return driver.returncode
        lines = [line for line in driver.stdout.splitlines() if line.startswith(MARK)]
        if not lines:
            sys.stderr.write(driver.stdout[-2000:])
            return 1
        result = json.loads(lines[-1][len(MARK):])
        result["seconds_total"] = time.perf_counter() - started
        print(json.dumps(result))
        return 0
    finally:
        stop_ray(env)
        for i in range(HOSTS):
            sh("ip", "netns", "del", f"h{i}", check=False)
        sh("umount", "/run/netns", check=False)
        shutil.rmtree(work, ignore_errors=True)


def drive() -> None:
    """On host h0: replicas on h0..h2, the streams on h1 and h2, h2's raylet killed, h1's link cut."""
    sys.path.insert(0, str(REPO))
    import ray

    from jaxinfer.replicas.cluster import Cluster
    from jaxinfer.replicas.ray_replica import start_replicas
    from jaxinfer.router.base import Router
    from jaxinfer.sampling_params import SamplingParams
    from tests.engine.test_migration import PROMPT
    from tests.engine.tiny_engine import CharTokenizer
    from tests.replicas.ray_driver import PROMPTS, replica_engine

    class Alternate(Router):
        """New requests to replicas 1 and 2 in turn (replica 0 stays free to take over)."""

        name, interval = "alternate", 60.0

        def __init__(self):
            self.count = 0

        def dispatch(self, request, replicas, now):
            self.count += 1
            live = [r.replica for r in replicas if r.accepting and r.replica != 0] or [0]
            return live[self.count % len(live)]

    ray.init(address=f"{SUBNET}.1:6379")
    replicas = start_replicas(replica_engine, HOSTS, warm_up=False, max_restarts=0,
                              options=[{"num_cpus": 0 if i == 0 else 1, "resources": {f"host{i}": 1}}
                                       for i in range(HOSTS)])
    for replica in replicas:
        replica.silence_seconds = 5.0
    tokenizer = CharTokenizer()
    params = SamplingParams(max_tokens=70, ignore_eos=True, temperature=0.0)
    distinct = [PROMPT, *PROMPTS]
    reference_engine = replica_engine()
    outputs = [o.output_ids for o in reference_engine.generate([tokenizer.encode(p) for p in distinct], params)]
    prompts = [distinct[k % len(distinct)] for k in range(STREAMS)]
    reference = [outputs[k % len(distinct)] for k in range(STREAMS)]
    phases = {}

    async def run():
        cluster = Cluster(replicas, Alternate(), step_timeout=5)
        streams = [await cluster.add_request(tokenizer.encode(p), params, f"n{k}") for k, p in enumerate(prompts)]
        tokens = [[] for _ in streams]

        async def read(stream, into):
            async for output in stream:
                into += output.new_token_ids
        readers = [asyncio.ensure_future(read(s, t)) for s, t in zip(streams, tokens, strict=True)]
        while sum(map(len, tokens)) < 20:
            await asyncio.sleep(0.05)
        start = time.perf_counter()
        phases["tokens_at_faults"] = sum(map(len, tokens))
        sh(*in_host(1, "ip", "link", "set", "eth0", "down"))  # host 1 cut off: its replica falls silent
        os.kill(raylet_pid(2), signal.SIGKILL)  # host 2's raylet dies (its workers follow)
        while (replicas[1].alive or replicas[2].alive) and time.perf_counter() - start < 60:
            await asyncio.sleep(0.1)
        phases["both_detected"] = time.perf_counter() - start
        phases["tokens_at_detection"] = sum(map(len, tokens))
        start = time.perf_counter()
        errors = [repr(e) for e in await asyncio.gather(*readers, return_exceptions=True) if e is not None]
        phases["finished_after"] = time.perf_counter() - start
        return tokens, errors, dict(cluster.failover)
    tokens, errors, failover = asyncio.run(run())
    print(MARK + json.dumps({"tokens": tokens, "reference": reference, "errors": errors, "failover": failover,
                             "phases": phases}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive()
    else:
        sys.exit(outer(args.timeout))
