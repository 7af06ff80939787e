"""Without RAY_ADDRESS, `init_ray` starts a Ray of its own, whatever else runs on the machine, and Ray's state API
inside its workers reaches that Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PROBE = """
import ray
from restoration.cluster import init_ray
init_ray(num_cpus=1)
print("gcs", ray.get_runtime_context().gcs_address)

@ray.remote
def nodes_seen_by_the_state_api():  # what Ray Train's helper actors ask at the end of every run
    from ray.util.state import list_nodes
    return [node.node_id for node in list_nodes(timeout=20)]

print("state", ray.get(nodes_seen_by_the_state_api.remote()) == [ray.get_runtime_context().get_node_id()])
ray.shutdown()
"""


@pytest.mark.slow
def test_without_ray_address_a_new_local_ray_starts_even_where_ray_start_left_one():
    # What `ray start` leaves behind: the address of its cluster in <Ray's temp dir>/ray_current_cluster, which
    # `ray.init()` joins by default. Here it names an address nothing listens on (a short temp dir: Ray's socket paths
    # must fit in 107 characters).
    with tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as tmp:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    gcs = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("gcs ")]
    assert gcs and gcs[0] != "127.0.0.1:9", done.stdout
    # The state API in a worker asks the new Ray, not the one the file names (which would take 40 s to give up).
    assert "state True" in done.stdout.splitlines(), done.stdout
