"""The local Ray that `init_ray` starts when no cluster is configured."""

from __future__ import annotations

import os


def _session_processes(session_dir: str) -> list[str]:
    """The command lines of the processes started for this Ray session (they name its folder)."""
    lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if session_dir in cmd:
            lines.append(cmd)
    return lines


def test_a_local_ray_runs_without_the_dashboard_and_keeps_the_state_api(ray_cluster):
    ray = ray_cluster
    node = ray._private.worker._global_node
    processes = _session_processes(node.get_session_dir_path())
    assert any("raylet" in cmd for cmd in processes), processes  # the scan sees this session's processes
    assert not node.webui_url
    # Ray's API server process stays, with none of the dashboard's modules (each a process of its own otherwise).
    servers = [cmd for cmd in processes if "dashboard/dashboard.py" in cmd]
    assert len(servers) == 1 and "--modules-to-load=UsageStatsHead" in servers[0].split(), servers
    # `ray list ...` and the benchmark's worker sampling still get their answers.
    from ray.util.state import list_nodes

    assert [n.state for n in list_nodes(address=ray.get_runtime_context().gcs_address)] == ["ALIVE"]
