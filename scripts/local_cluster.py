"""A real two-node Ray cluster on one machine, on loopback: for tests and for trying `ray job submit` locally.

    python scripts/local_cluster.py            # head + one worker node; prints the exports; Ctrl-C stops both

Each node is a real `ray start` (head: GCS, dashboard with the job server; worker: its own raylet and object store)
with its own custom resource (`node_a`, `node_b`) so that work can be pinned to, or counted on, either node. The
cluster keeps to itself, so it runs beside other Ray instances on the machine (a training run's local Ray, say):

- its own temp dirs and explicit free ports for every listening component (nothing on Ray's defaults: 6379,
  8265, 10001, 52365 ... may belong to another instance);
- one `--temp-dir` per node: nodes that share one share its `runtime_resources/`, and one node's runtime-env agent
  then deletes a job's unpacked `--working-dir` while a driver on the other node still runs in it (the driver
  fails with a bare `FileNotFoundError` from `os.getcwd()`);
- it stops by process: every process of a node lives in the session that node's `ray start --block` leads, and only
  those sessions are signalled. `ray stop` is never used: it kills every Ray process on the machine;
- its own token: Ray 2.60 turns token authentication on for a head when `~/.ray/auth_token` exists, but a
  `ray start --address=...` node, or a `ray job submit` client, only sends a token when `RAY_AUTH_MODE=token` is set.
  Without that variable the second node retries `Unauthenticated` forever, which reads like an unreachable GCS.
  Here every process gets `RAY_AUTH_MODE=token` and a fresh `RAY_AUTH_TOKEN` (see `client_env`).

Loopback: `ray start --node-ip-address 127.0.0.1` does not do what it says. Ray rewrites `127.0.0.1`/`localhost`
(`services.resolve_ip_for_localhost`) to the address other machines would use, the first non-loopback interface
(e.g. 192.0.2.2), so the nodes advertise that address and every client follows it. The nodes here
advertise `127.0.0.2` instead: another address of the loopback network (127.0.0.0/8 is all loopback on Linux) that
Ray does not rewrite, so the whole cluster stays on `lo` and works with no external interface at all. Job clients
use the dashboard's HTTP address, `http://127.0.0.1:<port>`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from restoration.s3server import free_ports

NODE_IP = "127.0.0.2"  # loopback, but not one of the names Ray rewrites to the external address (see above)
DASHBOARD_HOST = "127.0.0.1"

# Per-node listening components that get an explicit port (the head adds GCS, dashboard and Ray Client).
_NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)
_HEAD_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port")
# Ports per node for worker processes (one each; a small cluster uses a few dozen), taken below Linux's ephemeral
# range (32768+) so that outgoing connections cannot occupy them between the check and the use.
_WORKER_PORTS = 200


class ClusterError(RuntimeError):
    """The local cluster could not be started."""


def free_port_range(size: int, start: int = 20000, stop: int = 30000) -> int:
    """First port of `size` consecutive ports in [start, stop) that are all free now (the worker port range)."""
    port = start
    while port + size <= stop:
        busy = None
        for p in range(port, port + size):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("", p))
                except OSError:
                    busy = p
                    break
        if busy is None:
            return port
        port = busy + 1
    raise ClusterError(f"no {size} consecutive free ports between {start} and {stop}")


@dataclass
class _Node:
    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None


@dataclass
class LocalCluster:
    """A head node and one worker node started with `ray start` on this machine.

    Args:
        cpus: logical CPUs of each node (what the scheduler hands out, not a limit on real cores).
        object_store_mb: object store size of each node (Ray's default, 30% of RAM per node, is far more than a
            test needs).
        resources: a custom resource per node, {node name: resource}; the first node is the head.
        temp_dir: folder for the nodes' temp dirs (TEMP_DIR/<node name>) and `ray start` logs; a fresh, short one
            when None (Ray's socket paths must stay under the 107-byte limit of Unix sockets).
        env: extra environment for the nodes (and so for every job driver and worker they start).
    """

    cpus: int = 2
    object_store_mb: int = 1024
    resources: dict[str, str] = field(default_factory=lambda: {"head": "node_a", "worker": "node_b"})
    temp_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.resources) != 2:
            raise ValueError(f"resources must name two nodes (head, worker), got {self.resources!r}")
        if self.cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {self.cpus}")
        self._own_temp = self.temp_dir is None
        self.temp_dir = self.temp_dir or tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        self.token = secrets.token_hex(32)  # the format Ray's own generator uses: 256 random bits as hex
        self._nodes: list[_Node] = []
        self.gcs_port = self.dashboard_port = 0

    # ---------------------------------------------------------------- addresses
    @property
    def gcs_address(self) -> str:
        return f"{NODE_IP}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The HTTP address for `ray job submit --address`, the job SDK and the state API."""
        return f"http://{DASHBOARD_HOST}:{self.dashboard_port}"

    @property
    def client_env(self) -> dict[str, str]:
        """Variables that point `ray job ...` (and `ray.init()`) at this cluster, with its token."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }

    def _node_env(self) -> dict[str, str]:
        # Not inherited: which cluster this shell talks to, and its S3 settings. Jobs bring S3 settings in their
        # runtime env (`--runtime-env-json '{"env_vars": {...}}'`), as they must on a real cluster, whose nodes never
        # see the submitting machine's environment.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("AWS_")
        }
        env.update(
            # Job entry points say `python ...`: the nodes must find this environment's interpreter first.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # SIGTERM means stop now: no 30 s drain (that exists for Serve replicas on Kubernetes).
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        )
        env.update(self.env)
        return env

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 120.0) -> LocalCluster:
        """Start the head, then the worker node, and wait until both are alive and the job server answers.

        Returns:
            self, running.
        """
        if self._nodes:
            return self
        ray = str(Path(sys.executable).parent / "ray")
        head_name, worker_name = self.resources
        ports = free_ports(len(_HEAD_PORT_FLAGS) + 2 * len(_NODE_PORT_FLAGS), host="")
        head_ports = dict(zip(_HEAD_PORT_FLAGS, ports[:3], strict=True))
        self.gcs_port, self.dashboard_port = head_ports["--port"], head_ports["--dashboard-port"]
        first_worker_port = free_port_range(2 * _WORKER_PORTS)
        common = ["--block", "--disable-usage-stats", f"--num-cpus={self.cpus}", "--num-gpus=0"]
        common += [f"--node-ip-address={NODE_IP}", f"--object-store-memory={self.object_store_mb * 2**20}"]
        specs = []
        for i, name in enumerate((head_name, worker_name)):
            node_ports = ports[3 + i * len(_NODE_PORT_FLAGS) : 3 + (i + 1) * len(_NODE_PORT_FLAGS)]
            low = first_worker_port + i * _WORKER_PORTS
            args = [ray, "start", *common, f"--temp-dir={Path(self.temp_dir) / name}"]
            args += [f"--resources={json.dumps({self.resources[name]: 1})}"]
            args += [f"{flag}={port}" for flag, port in zip(_NODE_PORT_FLAGS, node_ports, strict=True)]
            args += [f"--min-worker-port={low}", f"--max-worker-port={low + _WORKER_PORTS - 1}"]
            if i == 0:
                args += ["--head", f"--dashboard-host={DASHBOARD_HOST}"]
                args += [f"{flag}={port}" for flag, port in head_ports.items()]
            else:
                args += [f"--address={self.gcs_address}"]
            specs.append(_Node(name, args, Path(self.temp_dir) / f"ray-start-{name}.log"))
        deadline = time.monotonic() + timeout
        try:
            for spec in specs:
                self._launch(spec)
                self._wait_nodes(len(self._nodes), deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, node: _Node) -> None:
        with open(node.log_path, "wb") as log:
            # A new session per node: every process it starts (GCS, raylet, agents, workers) carries the session
            # id, which is how stop() finds them all and nothing else.
            node.proc = subprocess.Popen(
                node.args, stdout=log, stderr=subprocess.STDOUT, env=self._node_env(), start_new_session=True
            )
        self._nodes.append(node)

    def _wait_nodes(self, count: int, deadline: float) -> None:
        """Wait until the job server lists `count` alive nodes."""
        last = ""
        while time.monotonic() < deadline:
            for node in self._nodes:
                if node.proc.poll() is not None:
                    raise ClusterError(f"ray start for node {node.name!r} exited: {self._log_tail(node)}")
            try:
                alive = [n for n in self.nodes() if n["state"] == "ALIVE"]
                if len(alive) >= count:
                    return
                last = f"{len(alive)} of {count} nodes alive"
            except (OSError, urllib.error.URLError, ValueError) as e:
                last = str(e)
            time.sleep(0.5)
        tails = "; ".join(f"{n.name}: {self._log_tail(n)}" for n in self._nodes)
        raise ClusterError(f"cluster not up in time ({last}); {tails}")

    def nodes(self) -> list[dict]:
        """The cluster's nodes from the dashboard: dicts with node_id, node_ip, state, resources_total, is_head_node.

        Returns:
            One dict per node the GCS knows (alive or dead).
        """
        return self.api("/api/v0/nodes", limit=100, detail="true")["data"]["result"]["result"]

    def api(self, path: str, timeout: float = 30.0, **params):
        """GET `path` from the dashboard's HTTP API (the job server, the state API) with this cluster's token.

        Args:
            path: e.g. "/api/jobs/" or "/api/v0/tasks".
            params: query parameters; a list value repeats the key (the state API's filter_keys/values).

        Returns:
            The decoded JSON body.
        """
        query = f"?{urllib.parse.urlencode(params, doseq=True)}" if params else ""
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}{query}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def node_ids(self) -> dict[str, str]:
        """{custom resource name: node id} of the alive nodes."""
        ids = {}
        for node in self.nodes():
            if node["state"] != "ALIVE":
                continue
            for resource in self.resources.values():
                if resource in node.get("resources_total", {}):
                    ids[resource] = node["node_id"]
        return ids

    def _log_tail(self, node: _Node, lines: int = 5) -> str:
        try:
            text = node.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """Stop both nodes: SIGTERM to each `ray start --block` (it stops what it started), then SIGKILL to anything
        left in the nodes' sessions; remove a temporary temp dir."""
        nodes, self._nodes = self._nodes, []
        for node in reversed(nodes):  # the worker first, so it does not spend its last seconds looking for the GCS
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for node in nodes:
            _kill_session(node.proc.pid)
            if node.proc.poll() is None:
                node.proc.wait()
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def session_pids(sid: int) -> list[int]:
    """PIDs of the live processes in session `sid` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # /proc/PID/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces, so split after ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _kill_session(sid: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process of session `sid` (the processes one node started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs per node (default 2)")
    args = parser.parse_args(argv)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    with LocalCluster(cpus=args.cpus) as cluster:
        print(f"two-node Ray cluster up (nodes: {cluster.node_ids()}); point clients at it with:")
        for name, value in cluster.client_env.items():
            print(f"export {name}={value}")
        print(f"dashboard: {cluster.dashboard_url}")
        print("jobs bring their S3 settings, e.g. (with `restoration s3-server` running):")
        print('  ray job submit --working-dir . --runtime-env-json \'{"env_vars": {"AWS_ENDPOINT_URL": ...}}\' -- \\')
        print("      python jobs/restore.py s3://restoration/shards s3://restoration/restored")
        print("Ctrl-C stops both nodes", flush=True)
        while not stop:
            time.sleep(0.5)
        print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
