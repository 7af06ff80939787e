"""Peak memory and CPU time of this driver and its Ray workers, from `/proc`, while a block of code runs.

Memory: the driver's peak RSS comes from `resource.getrusage` after resetting the kernel's high-water mark
(`/proc/self/clear_refs`) at the start of each measurement; the workers' from `VmHWM` in `/proc/<pid>/status`,
sampled every half second (actors exit when their dataset finishes, so their peak must be caught while they live).
The workers are the children of this driver's raylet; when the driver joined an existing cluster, they are the
local workers the Ray state API lists.

CPU: every sample keeps each process's cumulative CPU seconds, so that `ResourceSampler.window` can split any stretch
of the run (its steady state, `steady_cpu`) by process and role, not just all of it.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

SAMPLE_INTERVAL_S = 0.5
MB = 2**20
_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's own per-node processes, not workers of the run
_BORING_TITLES = ("ray::IDLE",)


# ---------------------------------------------------------------------------------------------------------- /proc
def _read_status(pid: int | str) -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon of a process in bytes ({} when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmHWM", "VmRSS", "RssAnon"):
                    out[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (the 3rd field on), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (None when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _nice(pid: int | str) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[16]) if fields is not None else None  # field 19


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _children(parent: int) -> list[int]:
    """The child processes of `parent`: from /proc/PID/task/*/children where the kernel has it (one small read per
    thread of the parent, where a scan reads the stat file of every process on the machine, twice a second)."""
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
        pids = []
        for tid in tasks:
            with open(f"/proc/{parent}/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        return pids
    except FileNotFoundError:  # the parent is gone, or no children files (CONFIG_PROC_CHILDREN off): scan
        pass
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and fields[1] == str(parent):  # ppid, field 4
                pids.append(int(entry))
    return pids


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def own_cpu() -> float:
    """CPU seconds (user + system) of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def driver_peak_mb() -> float:
    """This process's peak RSS (since `reset_peak("self")`, where the kernel allows it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # ru_maxrss is in KiB on Linux


def reset_peak(pid: int | str) -> bool:
    """Reset a process's peak RSS (VmHWM, and with it getrusage's ru_maxrss): Linux >= 4.0, own processes."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _gpu_utilization() -> float | None:
    import torch

    try:
        return float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - needs pynvml; fall back to nvidia-smi
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.split()
        return float(out[0]) if out else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def role(titles: set[str] | list[str]) -> str:
    """A worker's role from the Ray titles it ran: "ray::_StatsActor.update_execution_metrics" -> "_StatsActor" (an
    actor's methods are one role), several roles joined by " + "."""
    names = sorted({re.sub(r"\.\w+$", "", t.removeprefix("ray::")) for t in titles})
    return " + ".join(names) or "workers that ran no named task"


# ------------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class WorkerUsage:
    pid: int
    roles: list[str]
    peak_mb: float
    peak_anon_mb: float  # private memory (RssAnon); RSS also counts the pages of Ray's object store it touched
    cpu_s: float
    nice: int | None


@dataclass(frozen=True)
class Resources:
    """What a `ResourceSampler` saw over its whole block."""

    wall_s: float
    method: str  # how the workers were found
    driver_peak_mb: float
    driver_peak_since: str  # "start of this measurement", or "process start" where the peak could not be reset
    driver_cpu_s: float
    driver_nice: int | None
    worker_nice: list[int]
    workers: int
    worker_peaks_reset: bool
    worker_peak_mb_max: float
    worker_peak_mb_sum: float
    worker_anon_mb_max: float
    worker_anon_mb_sum: float
    # Sums of peaks add up processes that never ran at the same time (a longer run starts more of them); this is
    # what the workers held together at the worst sample.
    worker_anon_mb_concurrent: float
    worker_cpu_s: float
    top_workers: list[WorkerUsage]  # the 6 that used the most CPU
    largest_worker: WorkerUsage | None  # by private memory
    other_cpu_s: dict[str, float]  # the `extra` processes (the S3 server)
    cpu_s_by_role: dict[str, float]  # largest first
    machine_busy_cores: float | None
    our_busy_cores: float | None  # the driver, the workers and the `extra` processes
    cpus: int
    gpu_util_mean: float | None
    gpu_util_max: float | None

    @property
    def run_cpu_s(self) -> float:
        """CPU seconds the run cost: the driver, every Ray worker of this node and the `extra` processes."""
        return self.driver_cpu_s + self.worker_cpu_s + sum(self.other_cpu_s.values())


@dataclass(frozen=True)
class CpuWindow:
    """Where the CPU went over a stretch of a sampled run (`ResourceSampler.window`)."""

    start: float  # Unix time of the first sample inside the stretch
    stop: float  # and of the last
    seconds: float
    cpu_s_by_role: dict[str, float]
    machine_busy_cores: float | None


@dataclass(frozen=True)
class SteadyCpu:
    """Where the CPU went in a run's steady state, and what the model actors got done with their share."""

    window: CpuWindow
    work: float  # rows' work (megapixels or images) finished inside the window
    model_cores: float  # the model actors' CPU seconds per second
    work_per_model_cpu_s: float | None


@dataclass
class _Tracked:
    """A worker as the sampler last saw it."""

    cpu0: float  # CPU seconds when the sampler first saw it (0 for a process started during the block)
    cpu: float = 0.0
    hwm: int = 0
    anon: int = 0
    titles: set[str] = field(default_factory=set)
    nice: int | None = None


class _Sample(NamedTuple):
    """Cumulative counters at one instant."""

    t: float  # Unix time
    driver: float  # CPU seconds
    workers: dict[int, float]  # pid -> CPU seconds
    extra: dict[str, float]  # name -> CPU seconds
    machine: tuple[float, float]  # (busy, total) jiffies


# ------------------------------------------------------------------------------------------------------- sampler
class ResourceSampler:
    """Peak memory and CPU time of this driver and its Ray workers while a block of code runs.

    Use as a context manager; `result` holds the `Resources` after the block. On CUDA it also samples GPU utilisation.

    Args:
        reset_workers: reset the workers' VmHWM at the start (only for workers of a raylet this driver started), so
            that workers reused from an earlier run report this run's peak.
        extra: name -> pid of other processes whose CPU time belongs to the run (the embedded S3 server).
    """

    def __init__(self, reset_workers: bool = True, extra: dict[str, int] | None = None) -> None:
        self.reset_workers = reset_workers
        self.extra = extra or {}
        self.result: Resources | None = None
        self._stop = threading.Event()
        self._workers: dict[int, _Tracked] = {}
        self._raylet = self._find_raylet()
        self._node_id: str | None = None
        self._state_pids: list[int] = []
        self._state_checked = 0.0
        self._gpu: list[float] = []
        self._live_anon_peak = 0  # the most private memory the workers held at one time (one sample)
        self._timeline: list[_Sample] = []

    @staticmethod
    def _find_raylet() -> int | None:
        for pid in _children(os.getpid()):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "raylet":
                        return pid
            except OSError:
                continue
        return None

    @property
    def method(self) -> str:
        if self._raylet is not None:
            return f"/proc: children of this driver's raylet (pid {self._raylet}), sampled every {SAMPLE_INTERVAL_S} s"
        return f"ray.util.state.list_workers (this node's live workers), /proc sampled every {SAMPLE_INTERVAL_S} s"

    def _worker_pids(self) -> list[int]:
        if self._raylet is not None:
            return [p for p in _children(self._raylet) if not _title(p).startswith(_AGENTS)]
        import ray

        if not ray.is_initialized():
            return []
        if time.monotonic() - self._state_checked > 5.0:  # the state API is an RPC: not on every sample
            self._state_checked = time.monotonic()
            try:
                from ray.util.state import list_workers

                self._node_id = self._node_id or ray.get_runtime_context().get_node_id()
                workers = list_workers(
                    address=ray.get_runtime_context().gcs_address,  # this driver's cluster, whatever else runs here
                    filters=[("is_alive", "=", True)],
                    limit=10_000,
                    raise_on_missing_output=False,
                )
                self._state_pids = [w.pid for w in workers if w.worker_type == "WORKER" and w.node_id == self._node_id]
            except Exception:  # noqa: BLE001 - no dashboard: no worker numbers, said in the result
                self._state_pids = []
        return self._state_pids

    def _sample(self) -> None:
        live_anon = 0
        worker_cpu: dict[int, float] = {}
        for pid in self._worker_pids():
            status = _read_status(pid)
            cpu = _cpu_seconds(pid)
            if not status or cpu is None:
                continue
            live_anon += status.get("RssAnon", 0)
            worker_cpu[pid] = cpu
            w = self._workers.setdefault(pid, _Tracked(cpu0=0.0))
            w.cpu, w.nice = cpu, _nice(pid)
            w.hwm = max(w.hwm, status.get("VmHWM", 0))
            w.anon = max(w.anon, status.get("RssAnon", 0))
            title = _title(pid).split(" ")[0]
            if title.startswith("ray::") and not title.startswith(_BORING_TITLES):
                w.titles.add(re.sub(r"\)\.\w+$", ")", title))  # "ray::MapWorker(...).submit": the method goes
        self._live_anon_peak = max(self._live_anon_peak, live_anon)
        extra_cpu = {name: _cpu_seconds(pid) or 0.0 for name, pid in self.extra.items()}
        self._timeline.append(_Sample(time.time(), own_cpu(), worker_cpu, extra_cpu, _machine_cpu()))
        if self._cuda:
            util = _gpu_utilization()
            if util is not None:
                self._gpu.append(util)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def __enter__(self) -> ResourceSampler:
        import torch

        self._cuda = torch.cuda.is_available()
        self._driver_reset = reset_peak("self")
        self._workers_reset = False
        # Workers that exist now are reused: their CPU time counts from here, their peak from a reset (when allowed).
        for pid in self._worker_pids():
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._workers[pid] = _Tracked(cpu0=cpu, cpu=cpu)
                if self.reset_workers and self._raylet is not None:
                    self._workers_reset = reset_peak(pid) or self._workers_reset
        self._extra0 = {name: _cpu_seconds(pid) or 0.0 for name, pid in self.extra.items()}
        self._driver_cpu0 = own_cpu()
        self._machine0 = _machine_cpu()
        self._t0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="throughput-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.perf_counter() - self._t0
        busy1, total1 = _machine_cpu()
        busy0, total0 = self._machine0
        cpus = os.cpu_count() or 1
        workers = [
            WorkerUsage(pid, sorted(w.titles), w.hwm / MB, w.anon / MB, w.cpu - w.cpu0, w.nice)
            for pid, w in self._workers.items()
            if w.hwm
        ]
        workers.sort(key=lambda w: -w.cpu_s)
        driver_cpu = own_cpu() - self._driver_cpu0
        extra_cpu = {name: (_cpu_seconds(pid) or 0.0) - self._extra0[name] for name, pid in self.extra.items()}
        by_role = self._by_role(driver_cpu, extra_cpu, {w.pid: w.cpu_s for w in workers})
        ours_cpu = sum(by_role.values())
        self.result = Resources(
            wall_s=wall,
            method=self.method,
            driver_peak_mb=driver_peak_mb(),
            driver_peak_since="start of this measurement" if self._driver_reset else "process start",
            driver_cpu_s=driver_cpu,
            driver_nice=_nice("self"),
            worker_nice=sorted({w.nice for w in workers if w.nice is not None}),
            workers=len(workers),
            worker_peaks_reset=self._workers_reset,
            worker_peak_mb_max=max((w.peak_mb for w in workers), default=0.0),
            worker_peak_mb_sum=sum(w.peak_mb for w in workers),
            worker_anon_mb_max=max((w.peak_anon_mb for w in workers), default=0.0),
            worker_anon_mb_sum=sum(w.peak_anon_mb for w in workers),
            worker_anon_mb_concurrent=self._live_anon_peak / MB,
            worker_cpu_s=sum(w.cpu_s for w in workers),
            top_workers=workers[:6],
            largest_worker=max(workers, key=lambda w: w.peak_anon_mb, default=None),
            other_cpu_s=extra_cpu,
            cpu_s_by_role=by_role,
            machine_busy_cores=(busy1 - busy0) / (total1 - total0) * cpus if total1 > total0 else None,
            our_busy_cores=ours_cpu / wall if wall > 0 else None,
            cpus=cpus,
            gpu_util_mean=float(np.mean(self._gpu)) if self._gpu else None,
            gpu_util_max=float(np.max(self._gpu)) if self._gpu else None,
        )

    def _by_role(self, driver: float, extra: dict[str, float], workers: dict[int, float]) -> dict[str, float]:
        """CPU seconds of the driver, the processes named in `extra` and the workers (pid -> CPU s) by what they ran,
        largest first."""
        by_role = {"driver": driver, **extra}
        for pid, cpu in workers.items():
            name = role(self._workers[pid].titles)
            by_role[name] = by_role.get(name, 0.0) + cpu
        return dict(sorted(by_role.items(), key=lambda kv: -kv[1]))

    def window(self, start: float, stop: float) -> CpuWindow | None:
        """Where the CPU went between Unix times `start` and `stop`: the stretch between the first sample at or after
        `start` and the last at or before `stop` (None when fewer than two samples fall inside)."""
        inside = [i for i, sample in enumerate(self._timeline) if start <= sample.t <= stop]
        if len(inside) < 2:
            return None
        first, last = self._timeline[inside[0]], self._timeline[inside[-1]]
        # Each worker's CPU as last seen up to either end: a worker that exits inside the window keeps what it used,
        # and one that starts inside it counts from its start (`cpu0`, 0 for a process new to the sampler).
        before: dict[int, float] = {}
        for sample in self._timeline[: inside[0] + 1]:
            before.update(sample.workers)
        after: dict[int, float] = {}
        for sample in self._timeline[inside[0] : inside[-1] + 1]:
            after.update(sample.workers)
        workers = {pid: cpu - before.get(pid, self._workers[pid].cpu0) for pid, cpu in after.items()}
        extra = {name: last.extra[name] - first.extra.get(name, 0.0) for name in last.extra}
        by_role = self._by_role(last.driver - first.driver, extra, workers)
        busy, total = last.machine[0] - first.machine[0], last.machine[1] - first.machine[1]
        return CpuWindow(
            start=first.t,
            stop=last.t,
            seconds=last.t - first.t,
            cpu_s_by_role=by_role,
            machine_busy_cores=busy / total * (os.cpu_count() or 1) if total > 0 else None,
        )


def steady_cpu(sampler: ResourceSampler, stamps: np.ndarray, work: np.ndarray, model: str) -> SteadyCpu | None:
    """Where the CPU went in a run's steady state, and what the model actors got done with their share.

    Args:
        sampler: the sampler that watched the run.
        stamps: per-row completion stamps (Unix seconds, one per model batch).
        work: per-row work (megapixels or images) in the same order.
        model: a name in the model actors' role ("RestoreActor", "GeneratorActor").
    Returns:
        None when the sampler saw too little of the steady state.
    """
    if not len(stamps):
        return None
    window = sampler.window(float(stamps.min()), float(stamps.max()))
    if window is None:
        return None
    done = float(work[(stamps > window.start) & (stamps <= window.stop)].sum())
    model_cpu = sum(cpu for name, cpu in window.cpu_s_by_role.items() if model in name)
    return SteadyCpu(
        window=window,
        work=done,
        model_cores=model_cpu / window.seconds,
        work_per_model_cpu_s=done / model_cpu if model_cpu > 0 else None,
    )
