"""Connecting to Ray: the one place that decides which cluster a driver uses and what its workers inherit."""

from __future__ import annotations

import os

# Passed on to Ray workers so that they reach the same object store as the driver. On a real cluster, prefer
# instance profiles or the nodes' own environment; these only fill in what the driver was given.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


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
    ray.init(
        address=address,
        num_cpus=None if address else num_cpus,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=True,
    )
