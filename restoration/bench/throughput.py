"""`restoration bench throughput`: the pipelines against the raw models and a naive script, in one process.

Restore, three ways, same model file and same images:
- limit: the raw model forward loop over pre-decoded tensors already in memory (`ModelRunner.forward`: BN folded,
  the pipeline's batch size, sliced on CPUs as the actor slices it), with the threads, precision and memory format
  that `RestoreActor` chooses on this cluster, under `torch.inference_mode()`; one loop per model actor, all at once
  (threads of this process). Nothing but the model runs, so no pipeline can beat it on the same hardware.
- ours: the images as input shards on S3 (`data.ingest`), then `run_restore` S3 -> Parquet on S3. End to end includes
  the Ray start-up (timed on its own, before the run); steady state is the megapixels restored after the first
  model batch over the span of the output's `restored_at` column (when the actor's model finished each row), i.e.
  from the first restored batch to the last.
- naive: what a user writes without us: boto3 get_object -> Pillow decode -> torch forward (same model, fp32, BN as
  trained, default torch threads, one image at a time) -> PNG encode -> boto3 put_object, sequentially.

Synthesis: the raw generator loop (same batch, threads and precision as `GeneratorActor`, one loop per actor, all at
once) against `run_synthesize`
writing Parquet to S3, end to end and in steady state (the images after the first generator batch over the span of
the output's `generated_at` column). Training: a 1-worker Ray Train restorer run against the same loop in plain PyTorch
(`restorer_core` functions), both timed by the loops themselves, so start-up, data loading, validation and
checkpoints are left out of both.

Sizing: the default work is 256 noisy (sigma 25) 256x256 crops of Set12/Train400. `--min-model-seconds` (default 120)
first times the limit on a few batches and raises the image count (repeating images under new keys) until the model
alone needs that long, so that start-up costs do not dominate: about two minutes of pure model time is the smallest
run whose numbers say something about a long batch job.

Memory: the driver's peak RSS comes from `resource.getrusage` after resetting the kernel's high-water mark
(`/proc/self/clear_refs`) at the start of each measurement; the workers' from `VmHWM` in `/proc/<pid>/status` of the
Ray worker processes, sampled every half second while a run is going (actors exit when their dataset finishes). The
workers are the children of this driver's raylet, found in `/proc`; when the driver joined an existing cluster, they
are the local workers listed by the Ray state API (`ray.util.state.list_workers`).

CPU: each pipeline run's CPU seconds are split by process (the driver, the S3 server, the workers by what they ran),
over the whole run and, on CPUs, over its steady state in cores (`steady_cpu`), beside the model actors' work per
CPU second and the raw loop's. A steady state below the raw loop is then either cores the actors did not get (the
driver, the writes, Ray's own processes took them) or CPU they spent on more than the model.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
from PIL import Image

from restoration import codec, data, samples, storage
from restoration.sources import IMAGE_SUFFIXES

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATASETS = REPO.parent / "shared" / "datasets"
SECTIONS = ("restore", "synthesis", "training")
MIXED_SIZES = (180, 256, 512)  # Train400's size, Set12's two sizes
CALIBRATION_BATCHES = 2  # timed batches (after one warm-up batch) that size the run for --min-model-seconds
RECHECK_BATCHES = 8  # timed batches per stream of the limit loop run again at the end (see `bench_restore`)
# A steady state more than this factor above the limit is a measuring artefact, not a rate (see bench_restore).
STEADY_SLACK = 1.05
MIN_STEADY_BATCHES = 3  # model batches (distinct `restored_at` stamps) a steady-state figure needs at the least
SAMPLE_INTERVAL_S = 0.5
_MB = 2**20


@dataclass(frozen=True)
class ThroughputConfig:
    """What one benchmark run measures."""

    only: tuple[str, ...] = SECTIONS
    images: str | None = None  # folder of images; None: Train400 + Set12, or the sample photos
    count: int = 256
    size: int = 256
    mixed_sizes: bool = False
    noise: float = 25.0  # sigma (0-255) of the Gaussian noise baked into the input PNGs; 0 keeps the images as they are
    model: str = "denoise-gray"
    batch_size: int = 8  # RestoreConfig's default
    compile: bool = False  # torch.compile the restorer, in the limit loop and in the pipeline's actors alike
    min_model_seconds: float = 120.0
    shard_mb: float = 4.0
    synth_model: str = "dcgan-fmnist"
    synth_count: int = 100_000  # about a minute of the raw generator on 2 cores, so start-up does not dominate
    synth_batch_size: int = 64  # SynthesizeConfig's default
    train_preset: str = "restorer-dncnn-cpu"
    train_epochs: int = 4
    train_steps_per_epoch: int = 50
    scale_check: bool = False
    store: str | None = None  # s3://bucket/prefix; None: an embedded SeaweedFS server (or `local`)
    local: str | None = None  # a local folder instead of S3: no S3 server, and the naive script reads/writes files
    naive_count: int | None = None  # images the naive script restores (the first ones); None: all of them
    out_dir: str = "bench-output"
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.only if s not in SECTIONS]
        if not self.only or unknown:
            raise ValueError(f"--only must name some of {', '.join(SECTIONS)}, got {','.join(self.only)!r}")
        for name in ("count", "size", "batch_size", "synth_count", "synth_batch_size", "train_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.train_steps_per_epoch < 1:
            raise ValueError(f"--train-steps-per-epoch must be >= 1, got {self.train_steps_per_epoch}")
        if not (self.min_model_seconds >= 0 and math.isfinite(self.min_model_seconds)):
            raise ValueError(f"--min-model-seconds must be a number >= 0, got {self.min_model_seconds}")
        if not (0 <= self.noise < math.inf) or not self.shard_mb > 0:
            raise ValueError(f"--noise must be >= 0 and --shard-mb > 0, got {self.noise} and {self.shard_mb}")
        if self.store is not None and not storage.is_s3(self.store):
            raise ValueError(f"--store must be an s3://bucket/prefix URI, got {self.store!r}")
        if self.local is not None and (self.store is not None or storage.is_s3(self.local)):
            raise ValueError(f"--local takes a local folder and excludes --store, got {self.local!r}")
        if self.naive_count is not None and self.naive_count < 1:
            raise ValueError(f"--naive-count must be >= 1, got {self.naive_count}")


# ------------------------------------------------------------------------------------------------------- the work
@dataclass(frozen=True)
class WorkImage:
    key: str
    png: bytes
    height: int
    width: int


def _open_uint8(path: Path, gray: bool) -> np.ndarray:
    with Image.open(path) as image:
        colour = not gray and image.mode not in ("1", "L", "LA", "I", "I;16", "F")
        return np.asarray(image.convert("RGB" if colour else "L"))


def source_images(folder: str | None) -> tuple[list[np.ndarray], str]:
    """The photos crops are cut from: `folder`, else Train400 + Set12, else the sample photos (as gray).

    Returns:
        (uint8 arrays (H, W) or (H, W, 3), a description of where they came from).
    """
    if folder is not None:
        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder!r}")
        return [_open_uint8(p, gray=False) for p in paths], str(folder)
    folders = [DEFAULT_DATASETS / name for name in ("Set12", "Train400")]
    if all(f.is_dir() for f in folders):
        paths = sorted(p for f in folders for p in f.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [_open_uint8(p, gray=True) for p in paths], f"Set12 + Train400 ({DEFAULT_DATASETS})"
    names = samples.GRAY_PHOTOS + samples.COLOR_PHOTOS
    return [_open_uint8(samples.sample_photo(n), gray=True) for n in names], "restoration.samples photos (gray)"


def cut_crops(sources: list[np.ndarray], count: int, sizes: tuple[int, ...], rng: np.random.Generator) -> list:
    """`count` square crops, the i-th of side sizes[i % len(sizes)], each from a random source large enough (the
    largest source scaled up when none is) at a random offset.

    Returns:
        uint8 arrays (S, S) or (S, S, 3).
    """
    crops = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        fitting = [s for s in sources if min(s.shape[:2]) >= size]
        if fitting:
            src = fitting[int(rng.integers(len(fitting)))]
        else:
            big = max(sources, key=lambda s: min(s.shape[:2]))
            scale = size / min(big.shape[:2])
            w, h = math.ceil(big.shape[1] * scale), math.ceil(big.shape[0] * scale)
            src = np.asarray(Image.fromarray(big).resize((w, h), Image.Resampling.LANCZOS))
        y = int(rng.integers(src.shape[0] - size + 1))
        x = int(rng.integers(src.shape[1] - size + 1))
        crops.append(np.ascontiguousarray(src[y : y + size, x : x + size]))
    return crops


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_work(config: ThroughputConfig) -> tuple[list[WorkImage], list[WorkImage], str]:
    """The distinct benchmark images: noisy crops as PNG (the restore inputs) and the clean ones (training data).

    Returns:
        (noisy images, clean images, where the crops came from); keys `img-000000.png`, ...
    """
    rng = np.random.default_rng(config.seed)
    sources, origin = source_images(config.images)
    sizes = MIXED_SIZES if config.mixed_sizes else (config.size,)
    noisy, clean = [], []
    for i, crop in enumerate(cut_crops(sources, config.count, sizes, rng)):
        key, (h, w) = f"img-{i:06d}.png", crop.shape[:2]
        clean.append(WorkImage(key, _png(crop), h, w))
        if config.noise > 0:  # N(0, sigma/255) on [0, 1] images, i.e. sigma on the 0-255 scale, then 8-bit PNG
            crop = np.clip(np.rint(crop + rng.normal(0.0, config.noise, crop.shape)), 0, 255).astype(np.uint8)
        noisy.append(WorkImage(key, _png(crop), h, w))
    return noisy, clean, origin


def repeat_work(work: list[WorkImage], count: int) -> list[WorkImage]:
    """`count` images cycling through `work`, each under a new key."""
    return [
        WorkImage(f"img-{i:06d}.png", w.png, w.height, w.width)
        for i, w in ((i, work[i % len(work)]) for i in range(count))
    ]


def _megapixels(work: list[WorkImage]) -> float:
    return sum(w.height * w.width for w in work) / 1e6


# ------------------------------------------------------------------------------------------------------ sampling
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


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _children(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
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


def _own_cpu() -> float:
    """CPU seconds (user + system) of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _nice(pid: int | str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19
    except (OSError, IndexError, ValueError):
        return None


def _reset_peak(pid: int | str) -> bool:
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


_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
_BORING_TITLES = ("ray::IDLE",)


class ResourceSampler:
    """Peak memory and CPU time of this driver and its Ray workers while a block of code runs.

    Use as a context manager; `result` holds the summary after the block. On CUDA it also samples GPU utilisation.

    Args:
        reset_workers: reset the workers' VmHWM at the start (only for workers of a raylet this driver started), so
            that workers reused from an earlier run report this run's peak.
        extra: name -> pid of other processes whose CPU time belongs to the run (the embedded S3 server).
    """

    def __init__(self, reset_workers: bool = True, extra: dict[str, int] | None = None) -> None:
        self.reset_workers = reset_workers
        self.extra = extra or {}
        self.result: dict = {}
        self._stop = threading.Event()
        self._workers: dict[int, dict] = {}
        self._raylet = self._find_raylet()
        self._node_id: str | None = None
        self._state_pids: list[int] = []
        self._state_checked = 0.0
        self._gpu: list[float] = []
        self._live_anon_peak = 0  # the most private memory the workers held at one time (one sample)
        # Every sample's cumulative CPU seconds (Unix time, driver, {worker pid: cpu}, {extra name: cpu}, machine
        # (busy, total) jiffies), so that `window` can split any stretch of the run, not just all of it.
        self._timeline: list[tuple[float, float, dict[int, float], dict[str, float], tuple[float, float]]] = []

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
            w = self._workers.setdefault(pid, {"cpu0": 0.0, "cpu": 0.0, "hwm": 0, "anon": 0, "titles": set()})
            w["cpu"], w["nice"] = cpu, _nice(pid)
            w["hwm"] = max(w["hwm"], status.get("VmHWM", 0))
            w["anon"] = max(w["anon"], status.get("RssAnon", 0))
            title = _title(pid).split(" ")[0]
            if title.startswith("ray::") and not title.startswith(_BORING_TITLES):
                w["titles"].add(re.sub(r"\)\.\w+$", ")", title))  # "ray::MapWorker(...).submit": the method goes
        self._live_anon_peak = max(self._live_anon_peak, live_anon)
        extra_cpu = {name: _cpu_seconds(pid) or 0.0 for name, pid in self.extra.items()}
        self._timeline.append((time.time(), _own_cpu(), worker_cpu, extra_cpu, _machine_cpu()))
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
        self._driver_reset = _reset_peak("self")
        self._workers_reset = False
        # Workers that exist now are reused: their CPU time counts from here, their peak from a reset (when allowed).
        for pid in self._worker_pids():
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._workers[pid] = {"cpu0": cpu, "cpu": cpu, "hwm": 0, "anon": 0, "titles": set()}
                if self.reset_workers and self._raylet is not None:
                    self._workers_reset = _reset_peak(pid) or self._workers_reset
        self._extra0 = {name: _cpu_seconds(pid) or 0.0 for name, pid in self.extra.items()}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._driver_cpu0 = usage.ru_utime + usage.ru_stime
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
        usage = resource.getrusage(resource.RUSAGE_SELF)
        busy1, total1 = _machine_cpu()
        busy0, total0 = self._machine0
        cpus = os.cpu_count() or 1
        workers = [
            {
                "pid": pid,
                "roles": sorted(w["titles"]),
                "peak_mb": w["hwm"] / _MB,
                "peak_anon_mb": w["anon"] / _MB,
                "cpu_s": w["cpu"] - w["cpu0"],
                "nice": w.get("nice"),
            }
            for pid, w in self._workers.items()
            if w["hwm"]
        ]
        workers.sort(key=lambda w: -w["cpu_s"])
        driver_cpu = usage.ru_utime + usage.ru_stime - self._driver_cpu0
        extra_cpu = {name: (_cpu_seconds(pid) or 0.0) - self._extra0[name] for name, pid in self.extra.items()}
        by_role = self._by_role(driver_cpu, extra_cpu, {w["pid"]: w["cpu_s"] for w in workers})
        ours_cpu = sum(by_role.values())
        self.result = {
            "wall_s": wall,
            "method": self.method,
            "driver_peak_mb": usage.ru_maxrss * 1024 / _MB,  # ru_maxrss is in KiB on Linux
            "driver_peak_since": "start of this measurement" if self._driver_reset else "process start",
            "driver_cpu_s": driver_cpu,
            "driver_nice": _nice("self"),
            "worker_nice": sorted({w["nice"] for w in workers if w["nice"] is not None}),
            "workers": len(workers),
            "worker_peaks_reset": self._workers_reset,
            "worker_peak_mb_max": max((w["peak_mb"] for w in workers), default=0.0),
            "worker_peak_mb_sum": sum(w["peak_mb"] for w in workers),
            "worker_anon_mb_max": max((w["peak_anon_mb"] for w in workers), default=0.0),
            "worker_anon_mb_sum": sum(w["peak_anon_mb"] for w in workers),
            # Sums of peaks add up processes that never ran at the same time (a longer run starts more of them);
            # this is what the workers held together at the worst sample.
            "worker_anon_mb_concurrent": self._live_anon_peak / _MB,
            "worker_cpu_s": sum(w["cpu_s"] for w in workers),
            "top_workers": workers[:6],
            "largest_worker": max(workers, key=lambda w: w["peak_anon_mb"], default=None),  # by private memory
            "other_cpu_s": extra_cpu,
            "cpu_s_by_role": by_role,
            "machine_busy_cores": (busy1 - busy0) / (total1 - total0) * cpus if total1 > total0 else None,
            "our_busy_cores": ours_cpu / wall if wall > 0 else None,
            "cpus": cpus,
            "gpu_util_mean": float(np.mean(self._gpu)) if self._gpu else None,
            "gpu_util_max": float(np.max(self._gpu)) if self._gpu else None,
        }

    def _by_role(self, driver: float, extra: dict[str, float], workers: dict[int, float]) -> dict[str, float]:
        """CPU seconds of the driver, the processes named in `extra` and the workers (pid -> CPU s) by what they ran,
        largest first."""
        by_role = {"driver": driver, **extra}
        for pid, cpu in workers.items():
            role = _role(self._workers[pid]["titles"])
            by_role[role] = by_role.get(role, 0.0) + cpu
        return dict(sorted(by_role.items(), key=lambda kv: -kv[1]))

    def window(self, start: float, stop: float) -> dict | None:
        """Where the CPU went between Unix times `start` and `stop`: the stretch between the first sample at or after
        `start` and the last at or before `stop` (None when fewer than two samples fall inside).

        Returns:
            {"from", "to", "seconds", "cpu_s_by_role" (as in `result`), "machine_busy_cores"}.
        """
        inside = [i for i, sample in enumerate(self._timeline) if start <= sample[0] <= stop]
        if len(inside) < 2:
            return None
        (t0, driver0, _, extra0, machine0), (t1, driver1, _, extra1, machine1) = (
            self._timeline[inside[0]],
            self._timeline[inside[-1]],
        )
        # Each worker's CPU as last seen up to either end: a worker that exits inside the window keeps what it used,
        # and one that starts inside it counts from its start (`cpu0`, 0 for a process new to the sampler).
        before: dict[int, float] = {}
        for sample in self._timeline[: inside[0] + 1]:
            before.update(sample[2])
        after: dict[int, float] = {}
        for sample in self._timeline[inside[0] : inside[-1] + 1]:
            after.update(sample[2])
        workers = {pid: cpu - before.get(pid, self._workers[pid]["cpu0"]) for pid, cpu in after.items()}
        extra = {name: extra1[name] - extra0.get(name, 0.0) for name in extra1}
        by_role = self._by_role(driver1 - driver0, extra, workers)
        busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
        return {
            "from": t0,
            "to": t1,
            "seconds": t1 - t0,
            "cpu_s_by_role": by_role,
            "machine_busy_cores": busy / total * (os.cpu_count() or 1) if total > 0 else None,
        }


def _role(titles: set[str] | list[str]) -> str:
    """A worker's role from the Ray titles it ran: "ray::_StatsActor.update_execution_metrics" -> "_StatsActor" (an
    actor's methods are one role), several roles joined by " + "."""
    names = sorted({re.sub(r"\.\w+$", "", t.removeprefix("ray::")) for t in titles})
    return " + ".join(names) or "workers that ran no named task"


def steady_cpu(sampler: ResourceSampler, stamps: np.ndarray, work: np.ndarray, model: str) -> dict | None:
    """Where the CPU went in a run's steady state, and what the model actors got done with their share.

    Args:
        sampler: the sampler that watched the run.
        stamps: per-row completion stamps (Unix seconds, one per model batch), as `steady_timeline` takes them.
        work: per-row work (megapixels or images) in the same order.
        model: a name in the model actors' role ("RestoreActor", "GeneratorActor").
    Returns:
        `ResourceSampler.window` over the steady state, plus "work" (rows finished inside it), "model_cores" (the
        model actors' CPU seconds per second) and "work_per_model_cpu_s"; None when the sampler saw too little of it.
    """
    if not len(stamps):
        return None
    window = sampler.window(float(stamps.min()), float(stamps.max()))
    if window is None:
        return None
    done = float(work[(stamps > window["from"]) & (stamps <= window["to"])].sum())
    model_cpu = sum(cpu for role, cpu in window["cpu_s_by_role"].items() if model in role)
    return {
        **window,
        "work": done,
        "model_cores": model_cpu / window["seconds"],
        "work_per_model_cpu_s": done / model_cpu if model_cpu > 0 else None,
    }


# ---------------------------------------------------------------------------------------------------- restore
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def limit_batches(actor, work: list[WorkImage], batch_size: int) -> list:
    """Pre-decoded model inputs: the distinct images decoded as the pipeline decodes them (`codec.decode`), adapted
    to the model's channels as `ModelRunner.restore_array` does, grouped by shape into batches of `batch_size`, in
    the actor's memory format on its device.

    Returns:
        [(images in the batch, megapixels, (B', C, H, W) tensor)].
    """
    import torch

    by_shape: dict[tuple, list[np.ndarray]] = {}
    for w in work:
        pixels = codec.decode(w.png).pixels  # (H, W, C) float32
        by_shape.setdefault(pixels.shape, []).append(pixels)
    batches = []
    for (h, w, c), arrays in by_shape.items():
        for i in range(0, len(arrays), batch_size):
            stack = np.stack(arrays[i : i + batch_size])  # (N, H, W, C)
            n = len(stack)
            x = torch.from_numpy(np.ascontiguousarray(stack.transpose(0, 3, 1, 2)))  # (N, C, H, W)
            if actor.channels == 1 and c == 3:
                x = x.reshape(n * 3, 1, h, w)
            elif actor.channels == 3 and c == 1:
                x = x.expand(n, 3, h, w)
            x = x.to(actor.device, memory_format=actor.memory_format)
            batches.append((n, n * h * w / 1e6, x))
    return batches


def run_limit(actor, batches: list, images: int, streams: int = 1) -> dict:
    """Time the raw forward loop over `images` images, cycling through the pre-built batches, in `streams` threads
    at once (one per model actor of the pipeline, each on the torch threads of one actor).

    Returns:
        {"images", "megapixels", "seconds", "cpu_s" (this process's, all threads), "mp_per_s", "images_per_s",
        "streams"}.
    """
    _sync(actor.device)
    t0, cpu0 = time.perf_counter(), _own_cpu()
    with ThreadPoolExecutor(streams) as pool:
        loops = [pool.submit(_limit_loop, actor, batches, n, k) for k, n in enumerate(_split(images, streams))]
        results = [loop.result() for loop in loops]
    _sync(actor.device)
    seconds, cpu_s = time.perf_counter() - t0, _own_cpu() - cpu0
    done, megapixels = sum(n for n, _ in results), sum(mp for _, mp in results)
    return {
        "images": done,
        "megapixels": megapixels,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "mp_per_s": megapixels / seconds,
        "images_per_s": done / seconds,
        "streams": streams,
    }


def _split(total: int, parts: int) -> list[int]:
    """`total` items in `parts` shares as equal as can be."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def _limit_loop(actor, batches: list, images: int, start: int) -> tuple[int, float]:
    """One stream of `run_limit`: `images` images from batch `start` on. Returns (images, megapixels)."""
    import torch

    done, megapixels, i = 0, 0.0, start
    with torch.inference_mode():  # per thread: each stream enters its own
        while done < images:
            n, mp, x = batches[i % len(batches)]
            if done + n > images:  # the last batch: only what is left
                keep = images - done
                x, mp, n = x[: keep * x.shape[0] // n], mp * keep / n, keep
            actor.forward(x)
            done, megapixels, i = done + n, megapixels + mp, i + 1
    return done, megapixels


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.strip("/")


def upload(work: list[WorkImage], prefix_uri: str, threads: int = 8) -> float:
    """PUT each image as its own object under `prefix_uri` (or write it as a file under a local folder). Returns the
    seconds taken."""
    t0 = time.perf_counter()
    if not storage.is_s3(prefix_uri):
        Path(prefix_uri).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda w: Path(prefix_uri, w.key).write_bytes(w.png), work))
        return time.perf_counter() - t0
    bucket, prefix = _split_s3(prefix_uri)
    client = storage.boto3_client()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda w: client.put_object(Bucket=bucket, Key=f"{prefix}/{w.key}", Body=w.png), work))
    return time.perf_counter() - t0


def stage_inputs(work: list[WorkImage], root: str, shard_mb: float) -> dict:
    """Upload the images as objects under `root/raw`, then ingest them into shards under `root/shards`.

    Returns:
        {"raw", "shards" (URIs), "shard_files", "rows", "upload_s", "ingest_s"}.
    """
    raw, shards = storage.join(root, "raw"), storage.join(root, "shards")
    upload_s = upload(work, raw)
    report = data.ingest(raw, shards, shard_mb=shard_mb, executor="local")
    if report.errors or report.rows != len(work):
        raise RuntimeError(f"ingest of {raw} wrote {report.rows} of {len(work)} rows; errors: {report.errors[:3]}")
    return {
        "raw": raw,
        "shards": shards,
        "shard_files": len(report.shards),
        "rows": report.rows,
        "upload_s": upload_s,
        "ingest_s": report.seconds,
    }


def _pipeline_cpu(resources: dict) -> float:
    """CPU seconds a pipeline run cost: the driver, every Ray worker of this node and the embedded S3 server."""
    return resources["driver_cpu_s"] + resources["worker_cpu_s"] + sum(resources["other_cpu_s"].values())


def _restore_config(config: ThroughputConfig, input_uri: str, out_uri: str):
    from restoration.pipelines.restore import RestoreConfig

    return RestoreConfig(
        input=input_uri, output=out_uri, model=config.model, batch_size=config.batch_size, compile=config.compile
    )


def steady_timeline(stamps: np.ndarray) -> tuple[float, np.ndarray, int, bool]:
    """A run's steady state from per-row completion stamps (Unix seconds; one stamp per model batch).

    Returns:
        (span from the first batch's stamp to the last, mask of the rows after the first batch, distinct batches,
        whether the span makes a rate: at least MIN_STEADY_BATCHES batches over a span > 0).
    """
    if not len(stamps):
        return 0.0, np.zeros(0, bool), 0, False
    span = float(stamps.max() - stamps.min())
    batches = len(np.unique(stamps))
    return span, stamps > stamps.min(), batches, batches >= MIN_STEADY_BATCHES and span > 0


def run_ours(
    config: ThroughputConfig, staged: dict, out_root: str, keys: list[str], extra_pids: dict[str, int]
) -> dict:
    """`run_restore` over the staged shards, measured: wall time, steady state from `restored_at`, memory.

    Returns:
        Seconds, MP/s (run and steady state), output checks (every key once, errors) and the sampler's summary.
    """
    from restoration.pipelines.restore import read_output, run_restore

    restore_config = _restore_config(config, staged["shards"], out_root)
    with ResourceSampler(extra=extra_pids) as sampler:
        started_at = time.time()
        report = run_restore(restore_config)
    written = read_output(report.output, ["key", "width", "height", "error", "restored_at"])
    out_keys = written.column("key").to_pylist()
    ok = [e is None for e in written.column("error").to_pylist()]
    widths, heights = written.column("width").to_pylist(), written.column("height").to_pylist()
    pixels = np.array([w * h if good else 0 for w, h, good in zip(widths, heights, ok, strict=True)], np.float64)
    megapixels = float(pixels.sum()) / 1e6
    stamps = np.asarray(written.column("restored_at").to_pylist(), dtype=np.float64)
    # Steady state: what the model stage delivered after its first batch, over the time from that batch to the last.
    span, after_first, batches, valid = steady_timeline(stamps)
    cpu = steady_cpu(sampler, stamps, pixels / 1e6, "RestoreActor")
    # The write phase split at the first and last restored row: filling the pipeline, steady state, draining it.
    write_start = started_at + report.phase_seconds["setup"]
    write_end = write_start + report.phase_seconds["write"]
    write_split = (
        {"fill": float(stamps.min()) - write_start, "steady": span, "drain": write_end - float(stamps.max())}
        if len(stamps)
        else {}
    )
    return {
        "run_id": report.run_id,
        "output": report.output,
        "rows_in": report.rows_in,
        "rows_out": written.num_rows,
        "errors": report.errors,
        "every_key_once": sorted(out_keys) == sorted(keys) and len(set(out_keys)) == len(out_keys),
        "megapixels": megapixels,
        "seconds": report.seconds,
        "mp_per_s": megapixels / report.seconds,
        "cpu_s": _pipeline_cpu(sampler.result),
        "steady_span_s": span,
        "steady_mp_per_s": float(pixels[after_first].sum()) / 1e6 / span if span > 0 else float("inf"),
        "steady_rows_per_s": int(after_first.sum()) / span if span > 0 else float("inf"),
        "steady_batches": batches,
        "steady_valid": valid,
        "steady_cpu": cpu,
        "workers": report.config.get("workers"),
        "gpu": report.config.get("gpu"),
        "phase_seconds": report.phase_seconds,
        "write_split_seconds": write_split,
        "resources": sampler.result,
    }


def run_naive(model: str, raw_uri: str, out_uri: str, keys: list[str], threads: int) -> dict:
    """The script a user writes without the pipeline: one image at a time, get -> decode -> forward -> encode -> put
    (on local folders: read the file -> ... -> write the file).

    Returns:
        {"images", "megapixels", "seconds", "cpu_s", "mp_per_s", "threads", "resources"}.
    """
    import torch

    from restoration.device import default_device
    from restoration.pipelines.restore import load_restorer

    torch.set_num_threads(threads)
    if storage.is_s3(raw_uri):
        bucket, src = _split_s3(raw_uri)
        out_bucket, dest = _split_s3(out_uri)
        client = storage.boto3_client()

        def get(key: str) -> bytes:
            return client.get_object(Bucket=bucket, Key=f"{src}/{key}")["Body"].read()

        def put(key: str, body: bytes) -> None:
            client.put_object(Bucket=out_bucket, Key=f"{dest}/{key}", Body=body)

    else:
        Path(out_uri).mkdir(parents=True, exist_ok=True)

        def get(key: str) -> bytes:
            return Path(raw_uri, key).read_bytes()

        def put(key: str, body: bytes) -> None:
            Path(out_uri, key).write_bytes(body)

    loaded = load_restorer(model)
    device = default_device()
    net = loaded.module.to(device).eval()
    mode = "L" if loaded.config.channels == 1 else "RGB"
    megapixels = 0.0
    with ResourceSampler(reset_workers=False) as sampler:
        t0, cpu0 = time.perf_counter(), _own_cpu()
        for key in keys:
            body = get(key)
            image = Image.open(io.BytesIO(body)).convert(mode)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            x = (x[None, None] if mode == "L" else x.permute(2, 0, 1)[None]).to(device)  # (1, C, H, W)
            with torch.no_grad():
                y = net(x).clamp(0, 1)
            restored = (y[0] * 255).round().byte().permute(1, 2, 0).squeeze(-1).cpu().numpy()
            buf = io.BytesIO()
            Image.fromarray(restored).save(buf, format="PNG")
            put(key, buf.getvalue())
            megapixels += image.width * image.height / 1e6
        seconds, cpu_s = time.perf_counter() - t0, _own_cpu() - cpu0
    return {
        "images": len(keys),
        "megapixels": megapixels,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "mp_per_s": megapixels / seconds,
        "threads": threads,
        "resources": sampler.result,
    }


def bench_restore(config: ThroughputConfig, env: dict, progress: Callable[[str], None]) -> dict:
    """The restore section: limit, ours, naive (and the scale check when asked for)."""
    import torch

    from restoration.cluster import actor_resources
    from restoration.pipelines.restore import RestoreActor, data_share

    noisy, _, origin = env["work"]
    # The pool `run_restore` sizes, from the share of the CPU decode and encode take next to the model on this image.
    sample = {"key": noisy[0].key, "image": noisy[0].png}
    workers, use_gpu, threads, actor_cpus, share, _ = actor_resources(
        None, None, lambda: data_share(_restore_config(config, "-", "-"), sample)
    )
    # The channels of these images (gray here), which pick the model of the family the actor runs.
    channels = codec.decode(noisy[0].png).pixels.shape[2]

    def limit_model() -> tuple:
        """The model the pipeline's actor runs on these images (building it sets this process's threads), and the
        pre-decoded batches of the limit loop."""
        actor = RestoreActor(config.model, threads=threads, precision="auto", compile=config.compile).runner(channels)
        return actor, limit_batches(actor, noisy, config.batch_size)

    actor, batches = limit_model()
    per_batch = max(n for n, _, _ in batches)

    # Calibrate: warm-up (one batch; with --compile one of every shape, each compiled on its first), then a few timed
    # batches; raise the count until the model alone needs the minimum.
    def warm_up(actor, batches: list) -> float:
        first_of_shape: dict[tuple, tuple] = {}
        for batch in batches:
            first_of_shape.setdefault(tuple(batch[2].shape), batch)
        t_warm = time.perf_counter()
        for batch in list(first_of_shape.values()) if config.compile else batches[:1]:
            run_limit(actor, [batch], batch[0])
        return time.perf_counter() - t_warm

    warm_up_s = warm_up(actor, batches)
    calibration = run_limit(actor, batches, CALIBRATION_BATCHES * per_batch * workers, streams=workers)
    count = config.count
    if config.min_model_seconds > 0:
        count = max(count, math.ceil(config.min_model_seconds * calibration["images_per_s"]))
    work = repeat_work(noisy, count)
    progress(
        f"restore: {count} images ({_megapixels(work):.1f} MP); calibration {calibration['mp_per_s']:.3f} MP/s, "
        f"so the model alone needs about {count / calibration['images_per_s']:.0f} s"
    )

    progress("restore: limit (raw model loop)")
    _reset_peak("self")
    limit = run_limit(actor, batches, count, streams=workers)
    limit["driver_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _MB
    limit.update(
        threads=torch.get_num_threads(),
        bf16=actor.bf16,
        memory_format=str(actor.memory_format),
        compiled=actor.compiled,
        warm_up_s=warm_up_s,
    )
    del batches, actor
    if use_gpu:
        torch.cuda.empty_cache()

    progress("restore: staging inputs (objects, then shards)")
    root = storage.join(env["root"], "restore")
    staged = stage_inputs(work, root, config.shard_mb)
    progress(f"restore: ours (run_restore over {staged['shard_files']} shards)")
    keys = [w.key for w in work]
    ours = run_ours(config, staged, storage.join(root, "out"), keys, env["extra_pids"])
    startup = env["ray_startup_s"]
    ours["end_to_end_s"] = ours["seconds"] + (startup or 0.0)
    ours["end_to_end_mp_per_s"] = ours["megapixels"] / ours["end_to_end_s"]
    # No pipeline outruns the raw model: a steady state faster than the limit says the limit loop ran on a busier
    # machine, or too few batches were timed.
    ours["steady_over_limit"] = ours["steady_valid"] and ours["steady_mp_per_s"] > STEADY_SLACK * limit["mp_per_s"]
    ours["steady_valid"] = ours["steady_valid"] and not ours["steady_over_limit"]

    naive_keys = keys[: config.naive_count]
    progress(f"restore: naive ({len(naive_keys)} images, sequential, {env['default_threads']} torch threads)")
    naive = run_naive(config.model, staged["raw"], storage.join(root, "naive"), naive_keys, env["default_threads"])

    # A shared VM's speed drifts by tens of percent within minutes, and ours ran minutes after the limit: a shorter
    # limit loop at the end brackets the runs, so a ratio off by the drift shows as such.
    progress("restore: limit loop again")
    actor, batches = limit_model()
    warm_up(actor, batches)
    limit_again = run_limit(actor, batches, RECHECK_BATCHES * per_batch * workers, streams=workers)
    del batches, actor
    torch.set_num_threads(env["default_threads"])
    limit_mean = (limit["mp_per_s"] + limit_again["mp_per_s"]) / 2

    result = {
        "images": count,
        "megapixels": _megapixels(work),
        "sizes": sorted({(w.height, w.width) for w in work}),
        "source": origin,
        "model": config.model,
        "batch_size": config.batch_size,
        "actors": workers,
        "actor_threads": threads,
        "actor_cpus": actor_cpus,
        "data_share": share,
        "gpu": use_gpu,
        "calibration": calibration,
        "staging": staged,
        "limit": limit,
        "limit_again": limit_again,
        "ours": ours,
        "naive": naive,
        "ratios": {
            "ours_steady_over_limit": ours["steady_mp_per_s"] / limit["mp_per_s"],
            "limit_again_over_limit": limit_again["mp_per_s"] / limit["mp_per_s"],
            "ours_steady_over_limit_mean": ours["steady_mp_per_s"] / limit_mean,
            "ours_end_to_end_over_limit": ours["end_to_end_mp_per_s"] / limit["mp_per_s"],
            "ours_end_to_end_over_naive": ours["end_to_end_mp_per_s"] / naive["mp_per_s"],
            "ours_run_over_naive": ours["mp_per_s"] / naive["mp_per_s"],
        },
    }
    if config.scale_check:
        result["scale_check"] = scale_check(config, env, noisy, progress)
    return result


def scale_check(config: ThroughputConfig, env: dict, noisy: list[WorkImage], progress: Callable) -> dict:
    """Ours at N = --count and at 10 N images: peak driver and worker memory of each (target: at most +25%)."""
    runs = {}
    for label, n in (("N", config.count), ("10N", 10 * config.count)):
        work = repeat_work(noisy, n)
        root = storage.join(env["root"], f"scale-{label}")
        progress(f"scale check: ours at {label} = {n} images")
        staged = stage_inputs(work, root, config.shard_mb)
        run = run_ours(config, staged, storage.join(root, "out"), [w.key for w in work], env["extra_pids"])
        res = run["resources"]
        runs[label] = {
            "images": n,
            "seconds": run["seconds"],
            "mp_per_s": run["mp_per_s"],
            "every_key_once": run["every_key_once"],
            "driver_peak_mb": res["driver_peak_mb"],
            "worker_peak_mb_max": res["worker_peak_mb_max"],
            "worker_peak_mb_sum": res["worker_peak_mb_sum"],
            "worker_anon_mb_max": res["worker_anon_mb_max"],
            "worker_anon_mb_sum": res["worker_anon_mb_sum"],
            "worker_anon_mb_concurrent": res["worker_anon_mb_concurrent"],
            "actor_anon_mb": max(
                (w["peak_anon_mb"] for w in res["top_workers"] if any("RestoreActor" in r for r in w["roles"])),
                default=0.0,
            ),
            "top_workers": res["top_workers"][:3],
            "largest_worker": res["largest_worker"],
        }

    def growth(name: str) -> float:
        return runs["10N"][name] / runs["N"][name] - 1.0 if runs["N"][name] else float("nan")

    names = (
        "driver_peak_mb",
        "worker_peak_mb_max",
        "worker_peak_mb_sum",
        "worker_anon_mb_max",
        "worker_anon_mb_sum",
        "worker_anon_mb_concurrent",
        "actor_anon_mb",
    )
    return {"runs": runs, "growth": {name: growth(name) for name in names}, "target_growth": 0.25}


# -------------------------------------------------------------------------------------------------- synthesis
def bench_synthesis(config: ThroughputConfig, env: dict, progress: Callable[[str], None]) -> dict:
    """Raw generator loop vs `run_synthesize` to Parquet on S3, images/s."""
    import torch

    from restoration.cluster import actor_resources
    from restoration.pipelines.synthesize import GeneratorActor, SynthesizeConfig, data_share, run_synthesize

    synth_config = SynthesizeConfig(
        model=config.synth_model,
        output=storage.join(env["root"], "synthesis"),
        count=config.synth_count,
        batch_size=config.synth_batch_size,
        run_id=f"bench-{env['tag']}",
    )
    workers, use_gpu, threads, _, share, _ = actor_resources(None, None, lambda: data_share(synth_config))
    actor = GeneratorActor(synth_config, run_id="raw", threads=threads)
    latent_dim = actor.loaded.config.latent_dim
    generator = actor.module.generator if actor.loaded.kind == "dcgan" else actor.module.decode
    z = torch.randn(config.synth_batch_size, latent_dim, generator=torch.Generator().manual_seed(config.seed))
    z = z.to(actor.device, actor.dtype)
    bf16, device = synth_config.precision == "bf16", actor.device

    def raw_loop(images: int) -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            done = 0
            while done < images:
                n = min(config.synth_batch_size, images - done)
                generator(z[:n])
                done += n

    def timed_raw_loops(images: int) -> float:
        """Seconds for `images` images, one loop per actor of the pipeline, each on its threads (after a warm-up)."""
        torch.set_num_threads(threads)
        raw_loop(config.synth_batch_size)
        _sync(device)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(raw_loop, _split(images, workers)))
        _sync(device)
        seconds = time.perf_counter() - t0
        torch.set_num_threads(env["default_threads"])
        return seconds

    progress(f"synthesis: raw generator loop, {config.synth_count} images, {workers} at once")
    cpu0 = _own_cpu()
    raw_s = timed_raw_loops(config.synth_count)
    raw_cpu = _own_cpu() - cpu0
    done = config.synth_count

    progress(f"synthesis: run_synthesize, {config.synth_count} images")
    with ResourceSampler(extra=env["extra_pids"]) as sampler:
        started_at = time.time()
        report = run_synthesize(synth_config)
    steady = synthesis_steady_state(report.output, started_at, sampler)

    # The raw loop again, shorter, at the end (see the restore section's limit loop again).
    progress("synthesis: raw generator loop again")
    again_images = max(workers * config.synth_batch_size, config.synth_count // 8)
    again_s = timed_raw_loops(again_images)
    raw_again = {"images": again_images, "seconds": again_s, "images_per_s": again_images / again_s}
    raw = {
        "images": done,
        "seconds": raw_s,
        "cpu_s": raw_cpu,
        "images_per_s": done / raw_s,
        "threads": threads,
        "streams": workers,
    }
    pipeline = {
        "images": report.rows_out - report.errors,
        "errors": report.errors,
        "complete": report.complete,
        "seconds": report.seconds,
        "images_per_s": (report.rows_out - report.errors) / report.seconds,
        "cpu_s": _pipeline_cpu(sampler.result),
        "phase_seconds": report.phase_seconds,
        "output": report.output,
        "resources": sampler.result,
        **steady,
    }
    return {
        "model": config.synth_model,
        "batch_size": config.synth_batch_size,
        "precision": synth_config.precision,
        "actors": workers,
        "data_share": share,
        "gpu": use_gpu,
        "raw": raw,
        "raw_again": raw_again,
        "pipeline": pipeline,
        "ratio_pipeline_over_raw": pipeline["images_per_s"] / raw["images_per_s"],
        "ratio_steady_over_raw": pipeline["steady_images_per_s"] / raw["images_per_s"],
        "ratio_raw_again_over_raw": raw_again["images_per_s"] / raw["images_per_s"],
        "ratio_steady_over_raw_mean": pipeline["steady_images_per_s"]
        / ((raw["images_per_s"] + raw_again["images_per_s"]) / 2),
    }


def synthesis_steady_state(output: str, started_at: float, sampler: ResourceSampler) -> dict:
    """The synthesis run's timeline from its `generated_at` column (when the generator finished each row's batch):
    the images after the first generator batch over the span from that batch to the last, the seconds from the
    start of `run_synthesize` (Unix time `started_at`) to the first batch, and where the CPU went in between
    (`steady_cpu`, from the `sampler` that watched the run)."""
    from restoration.pipelines.restore import read_output
    from restoration.pipelines.synthesize import OUTPUT_SCHEMA

    stamps = read_output(output, ["generated_at", "error"], OUTPUT_SCHEMA)
    ok = np.array([e is None for e in stamps.column("error").to_pylist()], bool)
    at = np.asarray(stamps.column("generated_at").to_pylist(), dtype=np.float64)[ok]
    span, after_first, batches, valid = steady_timeline(at)
    return {
        "first_image_s": float(at.min()) - started_at if len(at) else float("nan"),
        "steady_span_s": span,
        "steady_images_per_s": int(after_first.sum()) / span if span > 0 else float("nan"),
        "steady_batches": batches,
        "steady_valid": valid,
        "steady_cpu": steady_cpu(sampler, at, np.ones(len(at)), "GeneratorActor"),
    }


# --------------------------------------------------------------------------------------------------- training
def plain_training(train_config, images: list[np.ndarray], threads: int) -> dict:
    """The restorer's Ray Train loop (`restoration.train.restorer.train_loop_per_worker`) without Ray: the same
    per-epoch sampling, noise, optimiser and precision, timed per epoch the same way (the step loop only).

    Returns:
        {"epochs": [{"epoch", "samples_per_s", "epoch_seconds"}], "samples", "seconds", "samples_per_s", "cpu_s",
        "threads"}.
    """
    import torch

    from restoration.device import default_device
    from restoration.models.restorer import Restorer
    from restoration.train.restorer import train_epoch

    torch.set_num_threads(threads)
    cfg = train_config
    device = default_device()
    bf16 = cfg.precision == "bf16"
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    model = Restorer(cfg.model_config()).to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    epochs, cpu0 = [], _own_cpu()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        train_epoch(model, optimizer, cfg, images, 0, epoch, device)
        _sync(device)
        seconds = time.perf_counter() - t0
        samples_per_s = cfg.steps_per_epoch * cfg.batch_size / seconds
        epochs.append({"epoch": epoch, "samples_per_s": samples_per_s, "epoch_seconds": seconds})
    samples_total = total_steps * cfg.batch_size
    seconds_total = sum(e["epoch_seconds"] for e in epochs)
    return {
        "epochs": epochs,
        "samples": samples_total,
        "seconds": seconds_total,
        "samples_per_s": samples_total / seconds_total,
        "cpu_s": _own_cpu() - cpu0,
        "threads": threads,
    }


def bench_training(config: ThroughputConfig, env: dict, progress: Callable[[str], None]) -> dict:
    """1-worker Ray Train restorer vs the same loop in plain PyTorch, samples/s from the loops' own timings."""
    import ray
    import torch

    from restoration.train.launcher import LaunchConfig, threads_for
    from restoration.train.restorer import decode_rows
    from restoration.train.run import resolve_config, run_training

    _, clean, _ = env["work"]
    train_config = resolve_config(
        "restorer",
        config.train_preset,
        {"epochs": config.train_epochs, "steps_per_epoch": config.train_steps_per_epoch},
    )
    root = storage.join(env["root"], "training")
    progress("training: staging the clean images as shards")
    staged = stage_inputs(clean, storage.join(root, "data"), config.shard_mb)

    # The worker's CPUs and threads as `launcher.launch` sizes them by default for one worker.
    resources = ray.cluster_resources()
    use_gpu = int(resources.get("GPU", 0)) > 0
    cpus_per_worker = 2.0 if use_gpu else max(0.5, min(4.0, float(resources.get("CPU", 1)) - 1))
    threads = threads_for(cpus_per_worker)

    progress(f"training: Ray Train, {config.train_epochs} x {config.train_steps_per_epoch} steps")
    launch = LaunchConfig(storage=storage.join(root, "runs"), name=f"bench-{env['tag']}", workers=1, num_to_keep=None)
    with ResourceSampler(extra=env["extra_pids"]) as sampler:
        report = run_training("restorer", staged["shards"], launch, train_config)
    history = report.history
    ray_samples = sum(train_config.steps_per_epoch * train_config.batch_size for _ in history)
    ray_seconds = sum(m["epoch_seconds"] for m in history)
    ours = {
        "epochs": [
            {"epoch": int(m["epoch"]), "samples_per_s": m["samples_per_s"], "epoch_seconds": m["epoch_seconds"]}
            for m in history
        ],
        "samples": ray_samples,
        "seconds": ray_seconds,
        "samples_per_s": ray_samples / ray_seconds if ray_seconds else float("nan"),
        "run_seconds": report.seconds,
        "threads": threads,
        "resources": sampler.result,
    }

    progress("training: plain PyTorch loop")
    images = decode_rows([pa.table({"image": [w.png for w in clean]})], train_config.channels)
    plain = plain_training(train_config, images, threads)
    torch.set_num_threads(env["default_threads"])
    return {
        "preset": config.train_preset,
        "config": asdict(train_config),
        "ray_train": ours,
        "plain": plain,
        "ratio_ray_over_plain": ours["samples_per_s"] / plain["samples_per_s"],
    }


# ------------------------------------------------------------------------------------------------------- driver
def _environment(default_threads: int) -> dict:
    import ray
    import torch

    from restoration.device import cpu_has_bf16_units

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpu_bf16_units": cpu_has_bf16_units(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "default_torch_threads": default_threads,
        "load_average_at_start": os.getloadavg(),
    }


def benchmark(config: ThroughputConfig, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Run the selected sections and return every number measured (what `write_report` writes as JSON).

    Uses the S3 of `config.store` (with the `AWS_*` variables of the environment), the local folder `config.local`,
    or starts an embedded SeaweedFS server; uses the Ray of `RAY_ADDRESS` or an already initialised one, or starts (and stops) a local one.

    Args:
        config: what to measure.
        progress: called with one line per step.
    Returns:
        The results by section, plus "environment", "ray_startup_s" and "wall_seconds".
    """
    import ray
    import torch

    from restoration.cluster import init_ray
    from restoration.s3server import EmbeddedS3

    t_start = time.perf_counter()
    default_threads = torch.get_num_threads()
    tag = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    server, saved_env = None, {}
    if config.local is not None:
        root = storage.join(config.local, tag)
    elif config.store is None:
        server = EmbeddedS3().start()
        saved_env = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)  # before Ray starts: its workers inherit these
        root = server.uri("bench-throughput", tag)
    else:
        root = storage.join(config.store, tag)
    started_ray = False
    try:
        storage.ensure_bucket(root)
        progress("preparing images")
        work = make_work(config)
        ray_startup_s = None
        if not ray.is_initialized():
            t0 = time.perf_counter()
            init_ray()
            ray_startup_s = time.perf_counter() - t0
            started_ray = True
            progress(f"Ray started in {ray_startup_s:.1f} s")
        env = {
            "work": work,
            "root": root,
            "tag": tag,
            "ray_startup_s": ray_startup_s,
            "default_threads": default_threads,
            "extra_pids": {"s3_server": server._proc.pid} if server is not None and server._proc else {},
        }
        result: dict = {
            "config": asdict(config),
            "environment": _environment(default_threads),
            "store": root,
            "ray_startup_s": ray_startup_s,
            "ray_started_here": started_ray,
        }
        if "restore" in config.only:
            result["restore"] = bench_restore(config, env, progress)
        if "synthesis" in config.only:
            result["synthesis"] = bench_synthesis(config, env, progress)
        if "training" in config.only:
            result["training"] = bench_training(config, env, progress)
        result["driver_peak_rss_mb_lifetime"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _MB
        result["load_average_at_end"] = os.getloadavg()
        result["notes"] = observations(result)
        result["wall_seconds"] = time.perf_counter() - t_start
        return result
    finally:
        torch.set_num_threads(default_threads)
        if started_ray:
            ray.shutdown()
        if server is not None:
            server.stop()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def observations(result: dict) -> list[str]:
    """Plain-language notes on what the numbers show (where time and memory went)."""
    notes = []
    restore = result.get("restore")
    if restore:
        ours = restore["ours"]
        res = ours["resources"]
        fused = sorted({r for w in res["top_workers"] for r in w["roles"] if "->" in r})
        if fused:
            notes.append(f"restore: fused operators seen in the workers' titles: {', '.join(fused)}")
        actors = [w for w in res["top_workers"] if any("RestoreActor" in r for r in w["roles"])]
        actor = actors[0] if actors else None
        if actors:
            busy = [w["cpu_s"] / res["wall_s"] for w in actors]
            notes.append(
                f"restore: the {len(actors)} model actor process(es) used {', '.join(f'{b:.2f}' for b in busy)} cores "
                f"over the run ({sum(w['cpu_s'] for w in actors):.0f} CPU s in {res['wall_s']:.0f} s, "
                f"{restore['actor_threads']} torch thread(s) each; decoding and encoding run in tasks of their own); "
                f"the limit loop needed {restore['limit']['cpu_s']:.0f} CPU s for the same images"
            )
        if res["machine_busy_cores"] is not None:
            notes.append(
                f"restore: the machine was {res['machine_busy_cores']:.2f} of {res['cpus']} cores busy during ours, "
                f"{res['our_busy_cores']:.2f} of them this run's driver, Ray workers and S3 server; the rest is "
                "Ray's own processes (raylet, GCS, dashboard) and other load"
            )
        if ours.get("steady_over_limit"):
            notes.append(
                f"restore: steady state is not meaningful here: the restored_at span gives "
                f"{ours['steady_mp_per_s']:.3g} MP/s, faster than the limit loop; the machine was busier while the "
                "limit was measured, or the run is too short; measure on an idle machine with more images"
            )
        elif not ours["steady_valid"]:
            notes.append(
                f"restore: steady state is not meaningful here: the model restored the images in "
                f"{ours['steady_batches']} batch(es), fewer than {MIN_STEADY_BATCHES}; use more images"
            )
        driver_nice, actor_nice = res["driver_nice"], actor.get("nice") if actor else None
        if driver_nice is not None and actor_nice is not None and actor_nice > driver_nice:
            notes.append(
                f"restore: the restore actor ran at nice {actor_nice} (Ray's RAY_worker_niceness; lowering it needs "
                f"CAP_SYS_NICE), this driver at nice {driver_nice}: on a busy machine the limit and naive loops (in the "
                "driver) get the CPU before the model does"
            )
        if restore["naive"]["threads"] != restore["actor_threads"]:
            notes.append(
                f"restore: naive runs with {restore['naive']['threads']} torch threads, each of the "
                f"{restore['actors']} actor(s) with {restore['actor_threads']} (actor_resources splits the cores by "
                f"the measured data share, {_num(restore['data_share'])})"
            )
    if result.get("ray_startup_s") is None:
        notes.append("Ray was already running: end to end numbers exclude Ray's start-up")
    return notes


# ------------------------------------------------------------------------------------------------------ reports
def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def _row(label: str, rate, seconds, cpu_s, work, ratio: str = "") -> str:
    """One table line; `work` (MP or images) over `cpu_s` gives the work per CPU second (robust to other load)."""
    if isinstance(rate, str):  # the header
        return f"  {label:<46} {rate:>9} {seconds:>8} {cpu_s:>8} {work:>12}  {ratio}"
    per_cpu = work / cpu_s if work is not None and cpu_s else None
    cpu_text = f"{cpu_s:.1f}" if cpu_s is not None else "-"
    return f"  {label:<46} {_num(rate):>9} {seconds:>8.1f} {cpu_text:>8} {_num(per_cpu):>12}  {ratio}".rstrip()


def _steady_row(label: str, rate: float, span: float, valid: bool, ratio: str) -> str:
    """A steady-state table line: rate and ratio only when the span makes a rate (see `steady_timeline`)."""
    return _row(label, rate if valid else None, span, None, None, ratio if valid else "")


def _phases(phases: dict) -> str:
    """`{"setup": 2.1, "write": 120.4, ...}` -> "setup 2.1 s, write 120.4 s, ..." (what the report's seconds hold)."""
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()) or "not reported"


def _top_roles(by_role: dict[str, float], top: int, per: float = 1.0, digits: int = 1) -> str:
    """The `top` largest entries of a CPU split, each divided by `per`: "MapWorker(...) 291.9, driver 9.2, the rest 3.1"."""
    split = list(by_role.items())
    shown = ", ".join(f"{role} {cpu / per:.{digits}f}" for role, cpu in split[:top])
    rest = sum(cpu for _, cpu in split[top:]) / per
    return shown + (f", the rest {rest:.{digits}f}" if len(split) > top else "")


def _cpu_split(resources: dict, top: int = 6) -> str:
    """One line of the `top` largest CPU shares by process: "  CPU s by process: MapWorker(...) 291.9, driver 9.2"."""
    return f"  CPU s by process: {_top_roles(resources['cpu_s_by_role'], top)}"


def _steady_cpu_line(cpu: dict, unit: str, raw_rate: float, raw_per_cpu_s: float, raw_name: str, top: int = 5) -> str:
    """Where the cores went in the steady state (`steady_cpu`), in cores per process, and the model actors' work per
    CPU second and cores against the raw loop's: a steady state below the raw loop is either CPU the actors did not
    get or CPU they spent on more than the model."""
    seconds, busy = cpu["seconds"], cpu["machine_busy_cores"]
    return (
        f"  steady state's cores ({seconds:.0f} s of it): {_top_roles(cpu['cpu_s_by_role'], top, seconds, 2)}"
        + (f"; machine {busy:.2f} busy" if busy is not None else "")
        + f"; the model actors {_num(cpu['work_per_model_cpu_s'])} {unit}/CPU-s on {cpu['model_cores']:.2f} cores, "
        f"the {raw_name} {_num(raw_per_cpu_s)} on {raw_rate / raw_per_cpu_s:.2f}"
    )


def format_table(result: dict) -> str:
    """The human-readable summary: one line per measurement, ratios, memory."""
    lines = []
    restore = result.get("restore")
    if restore:
        limit, ours, naive = restore["limit"], restore["ours"], restore["naive"]
        startup = result.get("ray_startup_s")
        precision = "bf16" if limit["bf16"] else "fp32"
        ratios = restore["ratios"]
        startup_text = f"{startup:.1f} s" if startup else "not measured"
        lines += [
            f"RESTORE  {restore['model']}: {restore['images']} images, {restore['megapixels']:.1f} MP, "
            f"batch {restore['batch_size']}, {restore['actors']} actor(s) x {restore['actor_threads']} thread(s) "
            f"(data share {_num(restore['data_share'])}), "
            f"{precision}{', compiled' if limit.get('compiled') else ''}, {'GPU' if restore['gpu'] else 'CPU'}",
            _row("measure", "MP/s", "seconds", "CPU s", "MP/CPU-s", "ratio"),
            _row(
                f"limit: raw model loop, {limit['streams']} at once",
                limit["mp_per_s"],
                limit["seconds"],
                limit["cpu_s"],
                limit["megapixels"],
            ),
            _steady_row(
                "ours: steady state (restored_at span)",
                ours["steady_mp_per_s"],
                ours["steady_span_s"],
                ours["steady_valid"],
                f"{_num(ratios['ours_steady_over_limit'])} x limit",
            ),
            _row(
                "ours: run_restore (Ray already up)",
                ours["mp_per_s"],
                ours["seconds"],
                ours["cpu_s"],
                ours["megapixels"],
                f"{_num(ours['mp_per_s'] / limit['mp_per_s'])} x limit",
            ),
            _row(
                f"ours: end to end (Ray start-up {startup_text})",
                ours["end_to_end_mp_per_s"],
                ours["end_to_end_s"],
                None,
                None,
                f"{_num(ratios['ours_end_to_end_over_limit'])} x limit, "
                f"{_num(ratios['ours_end_to_end_over_naive'])} x naive",
            ),
            _row(
                "naive: boto3+Pillow+torch, 1 image at a time",
                naive["mp_per_s"],
                naive["seconds"],
                naive["cpu_s"],
                naive["megapixels"],
                f"{naive['threads']} torch threads, fp32",
            ),
        ]
        again = restore["limit_again"]
        lines.append(
            f"  limit loop again at the end ({again['seconds']:.0f} s): {_num(again['mp_per_s'])} MP/s, "
            f"{_num(ratios['limit_again_over_limit'])} x the first (the machine's drift); ours' steady state over "
            f"the mean of the two: {_num(ratios['ours_steady_over_limit_mean'])}"
        )
        lines.append(
            f"  run_restore phases: {_phases(ours['phase_seconds'])}; the write: {_phases(ours['write_split_seconds'])}"
        )
        res = ours["resources"]
        lines.append(
            f"  memory (ours): driver peak {res['driver_peak_mb']:.0f} MB; {res['workers']} Ray workers, "
            f"largest peak {res['worker_peak_mb_max']:.0f} MB (anon {res['worker_anon_mb_max']:.0f} MB), "
            f"sum of peaks {res['worker_peak_mb_sum']:.0f} MB; limit driver peak {limit['driver_peak_mb']:.0f} MB"
        )
        lines.append(_cpu_split(res))
        if ours.get("steady_cpu") and not restore["gpu"]:  # on a GPU the model's work is not CPU work
            limit_per_cpu_s = limit["megapixels"] / limit["cpu_s"]
            lines.append(_steady_cpu_line(ours["steady_cpu"], "MP", limit["mp_per_s"], limit_per_cpu_s, "limit loop"))
        if res["gpu_util_mean"] is not None:
            lines.append(f"  GPU utilisation (ours): mean {res['gpu_util_mean']:.0f}%, max {res['gpu_util_max']:.0f}%")
        scale = restore.get("scale_check")
        if scale:
            n, n10 = scale["runs"]["N"], scale["runs"]["10N"]
            lines.append(
                f"  scale check: {n['images']} -> {n10['images']} images: driver peak {n['driver_peak_mb']:.0f} -> "
                f"{n10['driver_peak_mb']:.0f} MB ({scale['growth']['driver_peak_mb']:+.0%}), largest worker peak "
                f"{n['worker_peak_mb_max']:.0f} -> {n10['worker_peak_mb_max']:.0f} MB "
                f"({scale['growth']['worker_peak_mb_max']:+.0%}), sum of worker peaks {n['worker_peak_mb_sum']:.0f} "
                f"-> {n10['worker_peak_mb_sum']:.0f} MB ({scale['growth']['worker_peak_mb_sum']:+.0%}); "
                f"target <= +{scale['target_growth']:.0%}"
            )
            grow = scale["growth"]
            lines.append(
                f"  scale check, private memory (RssAnon; RSS also counts the pages of Ray's shared object store a "
                f"worker touched): restore actor {n['actor_anon_mb']:.0f} -> {n10['actor_anon_mb']:.0f} MB "
                f"({grow['actor_anon_mb']:+.0%}), largest worker {n['worker_anon_mb_max']:.0f} -> "
                f"{n10['worker_anon_mb_max']:.0f} MB ({grow['worker_anon_mb_max']:+.0%}), sum "
                f"{n['worker_anon_mb_sum']:.0f} -> {n10['worker_anon_mb_sum']:.0f} MB "
                f"({grow['worker_anon_mb_sum']:+.0%}), all workers at once {n['worker_anon_mb_concurrent']:.0f} -> "
                f"{n10['worker_anon_mb_concurrent']:.0f} MB ({grow['worker_anon_mb_concurrent']:+.0%})"
            )
            largest = n10.get("largest_worker")
            if largest:
                lines.append(
                    f"  scale check: the largest worker at {n10['images']} images ran {', '.join(largest['roles'])}"
                )
    synthesis = result.get("synthesis")
    if synthesis:
        raw, pipe = synthesis["raw"], synthesis["pipeline"]
        lines += [
            f"SYNTHESIS  {synthesis['model']}: {raw['images']} images, batch {synthesis['batch_size']}, "
            f"{synthesis['precision']}, {synthesis['actors']} actor(s) x {raw['threads']} thread(s) "
            f"(data share {_num(synthesis['data_share'])})",
            _row("measure", "images/s", "seconds", "CPU s", "images/CPU-s", "ratio"),
            _row(
                f"raw generator loop, {raw['streams']} at once",
                raw["images_per_s"],
                raw["seconds"],
                raw["cpu_s"],
                raw["images"],
            ),
            _row(
                "run_synthesize -> Parquet on S3 (Ray up)",
                pipe["images_per_s"],
                pipe["seconds"],
                pipe["cpu_s"],
                pipe["images"],
                f"{_num(synthesis['ratio_pipeline_over_raw'])} x raw",
            ),
            _steady_row(
                "run_synthesize, steady state (generated_at span)",
                pipe["steady_images_per_s"],
                pipe["steady_span_s"],
                pipe["steady_valid"],
                f"{_num(synthesis['ratio_steady_over_raw'])} x raw",
            ),
            f"  run_synthesize phases: {_phases(pipe['phase_seconds'])}; first image {pipe['first_image_s']:.1f} s"
            " after the start",
            _cpu_split(pipe["resources"]) + f"; the raw loop {raw['cpu_s']:.1f}",
            f"  raw loop again at the end ({synthesis['raw_again']['images']} images): "
            f"{_num(synthesis['raw_again']['images_per_s'])} images/s, "
            f"{_num(synthesis['ratio_raw_again_over_raw'])} x the first (the machine's drift); the steady state "
            f"over the mean of the two: {_num(synthesis['ratio_steady_over_raw_mean'])}",
        ]
        if pipe.get("steady_cpu") and not synthesis["gpu"]:
            raw_per_cpu_s = raw["images"] / raw["cpu_s"]
            lines.append(_steady_cpu_line(pipe["steady_cpu"], "images", raw["images_per_s"], raw_per_cpu_s, "raw loop"))
    training = result.get("training")
    if training:
        ray_train, plain = training["ray_train"], training["plain"]
        lines += [
            f"TRAINING  {training['preset']}: {len(plain['epochs'])} epochs x "
            f"{training['config']['steps_per_epoch']} steps, batch {training['config']['batch_size']}, "
            f"patch {training['config']['patch_size']}, {plain['threads']} thread(s), "
            f"{training['config']['precision']} "
            "(step loops only: start-up, data loading, validation and checkpoints excluded)",
            f"  {'Ray Train, 1 worker':<44} {ray_train['samples_per_s']:>9.1f} samples/s "
            f"(whole run {ray_train['run_seconds']:.0f} s)",
            f"  {'plain PyTorch':<44} {plain['samples_per_s']:>9.1f} samples/s  "
            f"{_num(training['ratio_ray_over_plain'])} x plain",
        ]
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    return value


def write_report(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `throughput.json` (every number) and `throughput.md` (the table, notes and environment).

    Returns:
        {"json": path, "md": path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "throughput.json", "md": out / "throughput.md"}
    paths["json"].write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    env = result["environment"]
    md = [
        "# Throughput: pipelines vs raw models vs a naive script",
        "",
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; CPU: {env['cpu']} ({env['cpus']} cores, "
        f"bf16 units: {env['cpu_bf16_units']}); GPU: {env['cuda'] or 'none'}; torch {env['torch']}, Ray {env['ray']}; "
        f"load average at start {', '.join(f'{v:.2f}' for v in env['load_average_at_start'])}, at the end "
        f"{', '.join(f'{v:.2f}' for v in result.get('load_average_at_end', ()))}.",
        "",
        "```",
        format_table(result),
        "```",
        "",
        "How each number is taken (see `restoration/bench/throughput.py`):",
        "- limit: the raw model forward over pre-decoded tensors in memory (BN folded; the actor's batch, threads, "
        "precision and memory format).",
        "- ours, steady state: megapixels after the first model batch / (last - first `restored_at`), the time "
        "the actor's model finished each row; "
        "end to end: the whole `run_restore` plus Ray's start-up, timed on its own before the run.",
        "- naive: boto3 get -> Pillow decode -> fp32 forward -> PNG -> boto3 put, one image at a time.",
        "- synthesis: the generator forward alone vs `run_synthesize` (latents, generator, PNG, Parquet on S3); "
        "steady state: images after the first generator batch / (last - first `generated_at`).",
        "- training: samples/s of the step loops (the Ray Train loop's own per-epoch timings).",
        "- memory: driver peak from getrusage after resetting the peak; workers: VmHWM of the Ray worker processes "
        f"({result.get('restore', {}).get('ours', {}).get('resources', {}).get('method', 'see JSON')}).",
        "",
    ]
    if result.get("notes"):
        md += ["Notes:", *(f"- {n}" for n in result["notes"]), ""]
    paths["md"].write_text("\n".join(md))
    return paths


# ---------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restoration bench throughput`.

    Args:
        parser: the (sub)parser to add them to.
    """
    d = ThroughputConfig()
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated (default: all)")
    parser.add_argument("--images", default=None, help="folder of images to cut crops from (default: Set12+Train400)")
    parser.add_argument("--count", type=int, default=d.count, help=f"distinct images (default {d.count})")
    parser.add_argument("--size", type=int, default=d.size, help=f"crop side in px (default {d.size})")
    parser.add_argument("--mixed-sizes", action="store_true", help="crops of 180, 256 and 512 px in turn")
    parser.add_argument("--noise", type=float, default=d.noise, help="sigma of the input noise, 0-255 (default 25)")
    parser.add_argument("--model", default=d.model, help=f"restorer (default {d.model})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"restore batch (default {d.batch_size})")
    parser.add_argument(
        "--min-model-seconds",
        type=float,
        default=d.min_model_seconds,
        help="repeat images until the raw model alone needs this long (default 120; 0: exactly --count)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the restorer (limit loop and pipeline alike)"
    )
    parser.add_argument("--shard-mb", type=float, default=d.shard_mb, help="input shard size (default 4 MiB)")
    parser.add_argument("--synth-model", default=d.synth_model, help=f"generator (default {d.synth_model})")
    parser.add_argument("--synth-count", type=int, default=d.synth_count, help="images to synthesize (default 100000)")
    parser.add_argument("--train-preset", default=d.train_preset, help=f"restorer preset (default {d.train_preset})")
    parser.add_argument("--train-epochs", type=int, default=d.train_epochs, help="epochs (default 4)")
    parser.add_argument("--train-steps-per-epoch", type=int, default=d.train_steps_per_epoch, help="(default 50)")
    parser.add_argument("--scale-check", action="store_true", help="also run ours at --count and 10x --count images")
    parser.add_argument("--store", default=None, help="s3://bucket/prefix to use (default: an embedded SeaweedFS)")
    parser.add_argument("--local", default=None, help="work in this local folder instead of S3 (no S3 server)")
    parser.add_argument("--naive-count", type=int, default=None, help="images for the naive script (default: all)")
    parser.add_argument("--out", default=d.out_dir, help="output folder (default ./bench-output)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the crops and the noise (default 0)")


def config_from_args(args: argparse.Namespace) -> ThroughputConfig:
    """Build the config from parsed `add_arguments` options; ValueError names a bad value.

    Args:
        args: parsed arguments.
    Returns:
        The config.
    """
    return ThroughputConfig(
        only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
        images=args.images,
        count=args.count,
        size=args.size,
        mixed_sizes=args.mixed_sizes,
        noise=args.noise,
        model=args.model,
        batch_size=args.batch_size,
        compile=args.compile,
        min_model_seconds=args.min_model_seconds,
        shard_mb=args.shard_mb,
        synth_model=args.synth_model,
        synth_count=args.synth_count,
        train_preset=args.train_preset,
        train_epochs=args.train_epochs,
        train_steps_per_epoch=args.train_steps_per_epoch,
        scale_check=args.scale_check,
        store=args.store,
        local=args.local,
        naive_count=args.naive_count,
        out_dir=args.out,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """`restoration bench throughput`: run, print the table and notes, write the report files.

    Args:
        args: parsed `add_arguments` options.
    Returns:
        Exit code 0.
    """
    config = config_from_args(args)
    result = benchmark(config, progress=lambda line: print(f"[throughput] {line}", file=sys.stderr, flush=True))
    print(format_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    paths = write_report(result, config.out_dir)
    print(f"wall time {result['wall_seconds']:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="restoration bench throughput", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
