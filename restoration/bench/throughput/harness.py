"""One benchmark run: an S3 store (or a local folder) and a Ray cluster for it, then the selected sections in turn."""

from __future__ import annotations

import os
import platform
import time
import uuid
from datetime import datetime, timezone

from restoration import storage
from restoration.bench.summary import cpu_name
from restoration.bench.throughput.config import ThroughputConfig
from restoration.bench.throughput.report import notes
from restoration.bench.throughput.restore import bench_restore
from restoration.bench.throughput.result import Environment, ThroughputResult
from restoration.bench.throughput.sampler import driver_peak_mb
from restoration.bench.throughput.session import Progress, Session
from restoration.bench.throughput.synthesis import bench_synthesis
from restoration.bench.throughput.training import Trainer, bench_training
from restoration.bench.throughput.work import make_work
from restoration.errors import UserError


def environment(default_threads: int) -> Environment:
    import ray
    import torch

    from restoration.device import cpu_has_bf16_units

    return Environment(
        cpu=cpu_name(),
        cpus=os.cpu_count(),
        cpu_bf16_units=cpu_has_bf16_units(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        torch=torch.__version__,
        ray=ray.__version__,
        python=platform.python_version(),
        default_torch_threads=default_threads,
        load_average_at_start=os.getloadavg(),
    )


def benchmark(
    config: ThroughputConfig, progress: Progress = lambda line: None, trainer: Trainer | None = None
) -> ThroughputResult:
    """Run the selected sections.

    Uses the S3 of `config.store` (with the `AWS_*` variables of the environment), the local folder `config.local`,
    or starts an embedded SeaweedFS server; uses the Ray of `RAY_ADDRESS` or an already initialised one, or starts
    (and stops) a local one.

    Args:
        config: what to measure.
        progress: called with one line per step.
        trainer: the training code the training section measures (needed only for that section).
    """
    import ray
    import torch

    from restoration.cluster import init_ray
    from restoration.s3server import EmbeddedS3

    if "training" in config.only and trainer is None:
        raise UserError(
            "the training section needs trainer= (the training code it measures); without it use --only restore,synthesis"
        )
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
        extra_pids = {"s3_server": server.pid} if server is not None and server.pid is not None else {}
        session = Session(work, root, tag, ray_startup_s, default_threads, extra_pids)
        result = ThroughputResult(  # the arguments are evaluated in order: the sections run between the two loads
            config=config,
            environment=environment(default_threads),
            store=root,
            ray_startup_s=ray_startup_s,
            ray_started_here=started_ray,
            restore=bench_restore(config, session, progress) if "restore" in config.only else None,
            upscale=bench_restore(config, session, progress, "upscale") if "upscale" in config.only else None,
            synthesis=bench_synthesis(config, session, progress) if "synthesis" in config.only else None,
            training=bench_training(config, session, progress, trainer) if "training" in config.only else None,
            driver_peak_rss_mb_lifetime=driver_peak_mb(),
            load_average_at_end=os.getloadavg(),
            wall_seconds=time.perf_counter() - t_start,
        )
        result.notes = notes(result)
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
