"""Connecting to Ray: the one place that decides which cluster a driver uses and what its workers inherit."""

from __future__ import annotations

import os

# Passed on to Ray workers so that they reach the same object store as the driver. Secrets (access keys, session
# tokens) are never forwarded: Ray writes every runtime env into its logs. Workers get them from their own
# environment: a local cluster's workers inherit the driver's, a real cluster's nodes have their own (or instance
# profiles), and a submitted job's `--runtime-env-json` reaches every worker.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class ClusterError(ValueError):
    """The Ray cluster cannot be reached or cannot run what was asked."""


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster at `RAY_ADDRESS`, or start a local one; a no-op when Ray is already initialised.

    Args:
        num_cpus: CPUs of a local cluster (default: all); ignored when joining an existing cluster.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside a submitted job the job's runtime_env already reaches every worker, and Ray refuses to merge a
        # second one into it.
        env_vars = {}
    try:
        ray.init(
            address=address,
            num_cpus=None if address else num_cpus,
            runtime_env={"env_vars": env_vars} if env_vars else None,
            configure_logging=True,
            logging_level="WARNING",
            log_to_driver=True,
        )
    except ConnectionError as e:
        # A wrong or unreachable RAY_ADDRESS is the user's to fix: say which address, in one line.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClusterError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address!r}: {reason}") from e


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


def actor_resources(workers: int | None, gpu: bool | None) -> tuple[int, bool, int, float]:
    """How to size a pool of model actors on the current cluster.

    Args:
        workers: actors wanted, or None for the default (one per GPU; on CPUs, one per 2 cores).
        gpu: True/False forces GPUs on/off; None uses them when the cluster has any.

    Returns:
        (actors, use_gpu, torch_threads, cpus_per_actor). The actors' CPU reservations always leave at least one
        core to Ray Data's read, decode and encode tasks: actors holding every CPU would starve the reads that feed
        them, and the job would wait forever.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if gpu is None else gpu
    if use_gpu and gpus == 0:
        raise ValueError("--gpu was given but the Ray cluster has no GPUs")
    cpus = max(1.0, float(resources.get("CPU", 1)))
    if use_gpu:
        return workers or gpus, True, 1, 1.0
    workers = workers or max(1, int(cpus // 2))
    threads = max(1, int(cpus // (2 * workers)))
    reservable = max(cpus - 1.0, cpus / 2)  # keep a core (or half of a tiny cluster) for the data operators
    return workers, False, threads, min(float(threads), reservable / workers)
