"""Connecting to Ray and sizing work on it: the one place that decides which cluster a driver uses, what its workers
inherit, whether they use GPUs, and how the pipelines' model actors and the training workers share the CPUs."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from restoration.errors import UserError

# Passed on to Ray workers so that they reach the same object store as the driver. Secrets (access keys, session
# tokens) are never forwarded: Ray writes every runtime env into its logs. Workers get them from their own
# environment: a local cluster's workers inherit the driver's, a real cluster's nodes have their own (or instance
# profiles), and a submitted job's `--runtime-env-json` reaches every worker.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "MKL_CBWR")

# Arrow's allocator in every worker, unless the driver's environment names one. pyarrow's default, mimalloc, keeps
# what a task freed: a restore run's data workers each held about 77 MB of it after their tasks were done, and Ray
# keeps those processes alive between tasks. jemalloc returns freed pages within a few seconds. In the benchmark's
# scale check (restore, 256 -> 2,560 images) the workers held at their worst sample 925 -> 1,115 and 934 -> 1,151 MB
# (+21 and +23 %) in two runs, against 1,014 -> 1,295 MB (+28 %) with mimalloc, at the same speed.
ARROW_MEMORY_POOL = "jemalloc"


def forwarded_env() -> dict[str, str]:
    """What every worker of the job inherits from the driver: its S3 endpoint and region settings, MKL's
    reproducibility mode (see `restoration.MKL_CBWR`), and Arrow's allocator (`ARROW_MEMORY_POOL` where this pyarrow
    has it, or the driver's own `ARROW_DEFAULT_MEMORY_POOL`)."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    pool = os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or (ARROW_MEMORY_POOL if _arrow_has_jemalloc() else None)
    if pool:
        env["ARROW_DEFAULT_MEMORY_POOL"] = pool
    return env


def _arrow_has_jemalloc() -> bool:
    import pyarrow as pa

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:  # pyarrow built without it (its macOS and Windows wheels)
        return False
    return True


class ClusterError(UserError):
    """The Ray cluster cannot be reached or cannot run what was asked."""


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster at `RAY_ADDRESS`, or start a local one; a no-op when Ray is already initialised.

    Without `RAY_ADDRESS` the cluster is always a new local one, never another that happens to run on this machine
    (Ray's own default joins the cluster the last `ray start` on it left running).

    Args:
        num_cpus: CPUs of a local cluster (default: all); ignored when joining an existing cluster.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    env_vars = forwarded_env()
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    if in_job:
        # Inside a submitted job the job's runtime_env already reaches every worker, and Ray refuses to merge a
        # second one into it.
        env_vars = {}
    local = address in (None, "local") and not in_job
    dashboard_port = _free_port() if local else None
    # Read by Ray's state API in every process of the new cluster (its raylet inherits the driver's environment as
    # it is now, and its workers the raylet's); see _STATE_API_ENV. Set for the start only: this process may start
    # another cluster later.
    saved = os.environ.get(_STATE_API_ENV)
    if dashboard_port:
        os.environ[_STATE_API_ENV] = f"http://127.0.0.1:{dashboard_port}"
    try:
        ray.init(
            # Without RAY_ADDRESS, "local" starts a cluster of our own: Ray's default would join whatever cluster a
            # `ray start` left running on this machine.
            address=address or ("auto" if in_job else "local"),
            num_cpus=None if address or in_job else num_cpus,
            runtime_env={"env_vars": env_vars} if env_vars else None,
            configure_logging=True,
            logging_level="WARNING",
            log_to_driver=True,
            **({"dashboard_port": dashboard_port} if dashboard_port else {}),
        )
    except ConnectionError as e:
        # A wrong or unreachable RAY_ADDRESS is the user's to fix: say which address, in one line.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClusterError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address!r}: {reason}") from e
    finally:
        if saved is None:
            os.environ.pop(_STATE_API_ENV, None)
        else:
            os.environ[_STATE_API_ENV] = saved


# The state API's address (the dashboard's URL) for every process of a local cluster this module starts. Without it,
# the state API in a worker looks for "the" cluster in /tmp/ray/ray_current_cluster, which names the cluster of the
# last `ray start` on this machine, not this one: when that cluster is gone, each call waits 40 s for its GCS. Ray
# Train asks from a helper actor at the end of every run, and the run's `fit()` waits 12 s for that helper to stop
# (measured: a one-worker run of a trivial function took 20 s with a stale file, 9 s with the address set).
_STATE_API_ENV = "RAY_API_SERVER_ADDRESS"


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now: the dashboard's port of a local cluster about to start."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prioritise_model_actor() -> int:
    """Run the calling Ray actor's process at niceness 0 where the OS permits it; returns the niceness it runs at.
    Outside a Ray actor (a driver building a model actor in-process, as the benchmarks do) nothing changes.

    Ray starts its workers at nice 15 (`RAY_worker_niceness`), the driver, raylet and GCS at 0. A model actor is the
    pipeline's bottleneck by design, and the read, decode and encode tasks around it have slack; at nice 15 the
    actor yields its core to every one of them that wakes on it. Measured on 2 CPU cores, the generator actor at
    nice 0 wrote 100,000 images in 149 s instead of 156 s on an otherwise idle machine, and 30,000 in 58 s instead
    of 63 s beside another nice-15 job. Lowering niceness needs CAP_SYS_NICE (root, in most containers); without it
    the process keeps Ray's niceness.
    """
    import ray

    if not hasattr(os, "getpriority"):  # no POSIX priorities on this platform
        return 0
    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    if in_actor and os.getpriority(os.PRIO_PROCESS, 0) > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except PermissionError:
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)


# CPUs reserved by each read, decode and encode task of the pipelines. It must differ from the model actors'
# reservation (`actor_resources` sees to it): Ray Data fuses neighbouring operators whose reservations are equal, and
# decode fused into the actor would run on the model's core, in series with the model.
# It also sets how many data tasks run at once on the core the actors leave (two), and so how many worker processes
# Ray keeps for them: each stays alive with 170 to 250 MB of private memory (`ray.data` alone is about 90 MB). At 0.25
# four ran at once, and a 2,560-image restore on 2 cores kept one or two more of them alive than a 256-image one did:
# the workers together held 40 to 50 % more at their worst. With two at once it was 28 to 29 % (1,014 -> 1,295 MB at
# 0.4), and the 2,560 images took 364 to 383 s against 377 to 393 s.
DATA_TASK_CPUS = 0.4

# Most model actors a CPU pool gets; past it, actors get more torch threads instead. Each actor holds its own copy of
# the model and of a batch's activations, so actors cost memory that threads do not.
MAX_CPU_ACTORS = 8


class Pool(NamedTuple):
    """How a pipeline's model actors and data tasks share the cluster (see `actor_resources`)."""

    actors: int
    gpu: bool
    threads: int  # torch threads per actor
    cpus_per_actor: float
    data_share: float | None  # the measured share of the CPU time outside the model; None when not measured
    data_tasks: int | None  # most tasks at once per data operator; None leaves it to Ray Data


def actor_resources(
    workers: int | None, gpu: bool | None, measure_data_share: Callable[[], float | None] | None = None
) -> Pool:
    """How to size a pool of model actors on the current cluster (see `split_cpus` for the CPU case).

    Args:
        workers: actors wanted, or None for the default (one per GPU; on CPUs, from the data share).
        gpu: True/False forces GPUs on/off; None uses them when the cluster has any.
        measure_data_share: called only when the pool runs on CPUs; returns the fraction of one image's CPU time
            outside the model (the pipelines measure it on a sample, see `restore.data_share`), or None when it
            cannot tell.
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if use_gpus(gpu, gpus):
        return Pool(workers or gpus, True, 1, 1.0, None, None)
    node_cpus = [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    share = measure_data_share() if measure_data_share is not None else None
    actors, threads, cpus_per_actor = split_cpus(node_cpus or [1.0], workers, share)
    return Pool(actors, False, threads, cpus_per_actor, share, data_task_cap(sum(node_cpus or [1.0]), share))


def use_gpus(gpu: bool | None, gpus: int) -> bool:
    """Whether a job runs on GPUs, for the pipelines' actors and the training workers alike.

    Args:
        gpu: True/False forces GPUs on/off (`--gpu`/`--no-gpu`); None uses them when the cluster has any.
        gpus: the GPUs of the cluster.
    """
    if gpu and gpus == 0:
        raise UserError("--gpu was given but the Ray cluster has no GPUs")
    return gpus > 0 if gpu is None else gpu


def train_resources(
    workers: int, gpu: bool | None, cpus_per_worker: float | None, free_cpus: float
) -> tuple[bool, float]:
    """How training workers are placed on the current cluster: whether they take a GPU each, and their CPUs.

    Args:
        workers: training workers.
        gpu: as for `use_gpus`.
        cpus_per_worker: CPUs each worker reserves, or None for `default_cpus_per_worker`.
        free_cpus: CPUs the datasets' reads need beside the workers; on CPU-only runs the workers may take the rest.

    Returns:
        (use_gpu, cpus_per_worker); raises UserError when CPU workers would leave the reads too little CPU.
    """
    import ray

    resources = ray.cluster_resources()
    use_gpu = use_gpus(gpu, int(resources.get("GPU", 0)))
    cpus = float(resources.get("CPU", 1))
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(cpus, workers, use_gpu)
    if not use_gpu and cpus_per_worker * workers > cpus - free_cpus:
        # Ray Data's read tasks need their slots too; without them the run waits forever.
        raise UserError(
            f"--cpus-per-worker {cpus_per_worker:g} x {workers} worker(s) leaves too little CPU for"
            f" reading the data ({free_cpus:g} needed, the cluster has {cpus:g});"
            f" expected at most {(cpus - free_cpus) / workers:g}"
        )
    return use_gpu, cpus_per_worker


def default_cpus_per_worker(cpus: float, workers: int, gpu: bool) -> float:
    """CPUs a training worker reserves unless told: 2 beside a GPU; on CPUs, all but one core of the cluster's `cpus`
    shared by the `workers` (at least half a core, at most 4). The core left over is Ray Data's read tasks', so the
    workers' data never starves (2 workers on 2 cores: 0.5 each)."""
    return 2.0 if gpu else max(0.5, min(4.0, (cpus - 1) / workers))


def threads_for(cpus: float) -> int:
    """Torch threads for a worker holding `cpus` CPUs (a fraction rounds up: 1.5 CPUs -> 2 threads)."""
    return max(1, math.ceil(cpus))


def data_task_cap(cpus: float, data_share: float | None) -> int | None:
    """Most tasks at once for a data operator beside a CPU pool (synthesis uses it for its Parquet writes): twice
    the cores the data side needs (`cpus` x `data_share`), at least 1; None (Ray Data's own limit) when the share is
    unknown.

    Each task uses a whole core while it runs, whatever it reserves, so that many tasks keep up with the actors.
    Left to itself, Ray Data runs as many as the CPU slots allow (two DATA_TASK_CPUS tasks on a core), each in a worker
    process of its own that has to start (about 2.5 CPU s on a 2-core AMD EPYC) and stays alive with its memory: in
    a 100,000-image synthesis run on 2 cores it started three processes for writes that one does. The restore
    pipeline leaves its operators uncapped: on 2 cores a cap of 1 on its read, decode and encode tasks changed
    neither its worker count (14 to 15 processes) nor its memory, and its speed not beyond the run-to-run spread.
    """
    if data_share is None:
        return None
    return max(1, math.ceil(2 * cpus * min(1.0, max(0.0, data_share))))


def split_cpus(node_cpus: list[float], workers: int | None, data_share: float | None) -> tuple[int, int, float]:
    """Split a CPU cluster between model actors and Ray Data's read, decode and encode tasks.

    The actors get the cores the data tasks leave, by how much of an image's CPU time the data side needs
    (`data_share`): one torch thread per actor up to MAX_CPU_ACTORS actors, more threads per actor past that.
    Separate single-threaded actors beat one actor with many threads when data tasks share the cores: a data task
    waking on a core slows one actor, where it would hold up every operator of a many-threaded one. Measured on 2
    cores with the fp32 `denoise-gray` (data share about 0.02): two single-threaded actors replace one actor beside a
    mostly idle core, and the pipeline restores twice as fast. With bfloat16 on AMX the model is about 10x cheaper,
    the data side needs about a quarter of the CPU, and the split stays at one actor beside a core for the data.

    Args:
        node_cpus: the CPUs of each node.
        workers: actors wanted, or None to choose.
        data_share: the data side's fraction of the CPU time, or None for half of it.

    Returns:
        (actors, torch_threads, cpus_per_actor). The reservations leave a core on every node (half of a 1-CPU node)
        to the data tasks, assuming the actors spread evenly: Ray Data's file listing reserves a whole CPU (it is not
        configurable), and actors holding every CPU would starve the reads that feed them, so the job would wait
        forever. A reservation is a scheduling promise, not a limit: two actors reserving 0.5 CPU each on 2 cores
        still run one thread each on a core of their own.
    """
    cpus, nodes, smallest = float(sum(node_cpus)), len(node_cpus), float(min(node_cpus))
    share = 0.5 if data_share is None else min(1.0, max(0.0, data_share))
    model_cores = max(1.0, cpus * (1.0 - share))
    workers = workers or max(1, min(MAX_CPU_ACTORS, round(model_cores)))
    threads = max(1, round(model_cores / workers))
    per_node = math.ceil(workers / nodes)
    cpus_per_actor = min(float(threads), max(smallest - 1.0, smallest / 2) / per_node)
    if math.isclose(cpus_per_actor, DATA_TASK_CPUS):  # not fused with the data tasks (see DATA_TASK_CPUS)
        cpus_per_actor *= 0.96
    return workers, threads, cpus_per_actor


def measure_share(model_step: Callable[[], object], data_steps: Callable[[], object], repeats: int = 1) -> float:
    """The fraction of CPU time `data_steps` take next to `model_step`, both run on one torch thread in this process.

    Each callable runs `repeats` times and its fastest run counts; callers run both once beforehand (as they do to
    build the steps' inputs), so allocations and kernel selection are not timed. The process's torch thread count is
    restored afterwards.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = []
        for step in (model_step, data_steps):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            best.append(min(times))
    finally:
        torch.set_num_threads(saved)
    model_s, data_s = best
    return data_s / (model_s + data_s) if model_s + data_s > 0 else 0.5
