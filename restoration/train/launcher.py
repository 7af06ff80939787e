"""The driver side of training: resolve a family's train config, then run its loop under one `TorchTrainer`.

    from restoration import train

    config = train.resolve_config("restorer", "restorer-dncnn-cpu", {"epochs": 2})
    where = train.LaunchConfig(storage="s3://bucket/runs", name="dncnn", workers=2)
    report = train.launch("restorer", config, where, data="s3://bucket/train400")

A run lives at `STORAGE/NAME/` (local folder or S3 prefix): Ray Train's checkpoints (each holds `state.pt` with the
model, optimizers, EMA and epoch, and `model.pt`, the exported model file), `config.json` (the resolved config),
and, when the run ends, `model.pt`: the best checkpoint's model file, which the pipelines load by path. Starting the
same NAME again resumes from its latest checkpoint; a finished run just exports again. What runs inside the workers
is `restoration.train.worker` and each family's `train_loop_per_worker`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from restoration import storage
from restoration.errors import UserError
from restoration.train import dcgan, inpainter, repairer, restorer, upscaler, vae

# kind -> (train config class, presets, train_loop_per_worker). Explicit: adding a family is one line.
TRAINERS: dict[str, tuple[type, dict[str, dict], Callable[[dict], None]]] = {
    "restorer": (restorer.RestorerTrainConfig, restorer.PRESETS, restorer.train_loop_per_worker),
    "dcgan": (dcgan.DCGANTrainConfig, dcgan.PRESETS, dcgan.train_loop_per_worker),
    "vae": (vae.VAETrainConfig, vae.PRESETS, vae.train_loop_per_worker),
    "upscaler": (upscaler.UpscalerTrainConfig, upscaler.PRESETS, upscaler.train_loop_per_worker),
    "inpainter": (inpainter.InpainterTrainConfig, inpainter.PRESETS, inpainter.train_loop_per_worker),
    "repairer": (repairer.RepairerTrainConfig, repairer.PRESETS, repairer.train_loop_per_worker),
}
READ_CPUS = 0.5  # CPUs per read task: the workers may hold all but half a core (cluster.train_resources checks)


@dataclass(frozen=True)
class LaunchConfig:
    """Where a training run lives and how it is placed on the cluster (the model's options are its train config)."""

    storage: str  # local folder or s3://bucket/prefix holding the run
    name: str  # run name: the same name resumes
    workers: int = 1
    gpu: bool | None = None  # None: GPUs when the cluster has them
    cpus_per_worker: float | None = None  # default: leaves a core for Ray Data on small machines
    max_failures: int = 2
    num_to_keep: int | None = 3

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if not self.name or "/" in self.name:
            raise UserError(f"--name must be a plain name without '/', got {self.name!r}")
        if self.max_failures < 0:
            raise UserError(f"--max-failures must be >= 0, got {self.max_failures}")


@dataclass
class TrainReport:
    kind: str
    name: str
    model_path: str
    model_sha256: str
    metrics: dict
    history: list[dict]  # the metrics of every kept checkpoint, by epoch (all of them when num_to_keep is None)
    seconds: float

    @property
    def epochs(self) -> list[int]:
        return [int(m["epoch"]) for m in self.history]

    def summary(self) -> str:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if isinstance(v, float))
        best = self.metrics.get("epoch")
        return (
            f"trained {self.kind} run {self.name!r} in {self.seconds:.0f} s; best checkpoint: epoch {best} ({shown}); "
            f"model: {self.model_path}"
        )


# --------------------------------------------------------------------------------------------------- the config
def resolve_config(kind: str, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """The train config of `kind` from a named preset (or the defaults) and field overrides.

    Returns:
        The family's frozen config dataclass; raises UserError naming a bad kind, preset, field or value.
    """
    config_cls, presets, _ = _trainer(kind)
    if preset is not None and preset not in presets:
        raise UserError(f"unknown preset {preset!r} for {kind}: expected one of {', '.join(presets)}")
    values = {**(presets[preset] if preset else {}), **(overrides or {})}
    try:
        return config_cls(**values)
    except TypeError as e:  # a field the config does not have
        raise UserError(f"bad {kind} config: {e}") from None
    except ValueError as e:  # a bad value, named by the config (or its model's config) that refused it
        raise UserError(str(e)) from e


def parse_overrides(kind: str, texts: Iterable[str]) -> dict[str, Any]:
    """`--set FIELD=VALUE` texts -> {field: value}, each value read as JSON (`lr=1e-3`, `init_from=null`) or else kept
    as a bare string (`arch=fast`); the field must be one of `kind`'s train config."""
    config_cls, _, _ = _trainer(kind)
    fields = [f.name for f in dataclasses.fields(config_cls)]
    overrides = {}
    for text in texts:
        if "=" not in text:
            raise UserError(f"--set {text!r}: expected FIELD=VALUE")
        name, raw = text.split("=", 1)
        if name not in fields:
            raise UserError(f"--set {name}: unknown field; expected one of {', '.join(fields)}")
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw
    return overrides


def _trainer(kind: str) -> tuple[type, dict[str, dict], Callable[[dict], None]]:
    """`TRAINERS[kind]`, or a UserError naming the kinds there are."""
    if kind not in TRAINERS:
        raise UserError(f"unknown model kind {kind!r}: expected one of {', '.join(TRAINERS)}")
    return TRAINERS[kind]


def dry_run(kind: str, config: Any, launch_config: LaunchConfig, data: str, val: str | None = None) -> str:
    """What `restoration train --dry-run` prints: the resolved run as JSON (`launch`'s arguments), nothing started."""
    resolved = {
        "kind": kind,
        "data": data,
        "val": val,
        **dataclasses.asdict(launch_config),
        "config": dataclasses.asdict(config),
    }
    return json.dumps(resolved, indent=2)


# ---------------------------------------------------------------------------------------------------------- the run
def build_datasets(data: str, val: str | None = None) -> dict:
    """Ray Datasets for a run: "train" (sharded across workers) and "val" (not split; rank 0 alone reads it): `val`,
    or without it the holdout of `data` (one image in 20, see `data.held_out`), which "train" then leaves out."""
    from restoration.data import read_images

    sources = {"train": (data, None if val else False), "val": (val, None) if val else (data, True)}
    return {
        name: read_images(uri, extra_columns=("label",), num_cpus=READ_CPUS, holdout=holdout)
        for name, (uri, holdout) in sources.items()
    }


def launch(kind: str, config: Any, launch_config: LaunchConfig, data: str, val: str | None = None) -> TrainReport:
    """Train `kind` on the current Ray cluster (a local one when none is configured) and export its model file.

    Args:
        kind: model family, a key of `TRAINERS`.
        config: the family's train config (`resolve_config`); written to STORAGE/NAME/config.json, and passed to
            every worker's `train_loop_per_worker` as `dataclasses.asdict(config)` plus `cpus_per_worker`.
        launch_config: where the run lives and how it is placed on the cluster.
        data: training images: input shards or a folder/prefix of images.
        val: validation images; None holds out one training image in 20 (see `build_datasets`).

    Returns:
        A TrainReport; the model file is at STORAGE/NAME/model.pt.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from restoration.checkpoint import load_model
    from restoration.cluster import init_ray, train_resources
    from restoration.data import input_files

    config_cls, _, loop = _trainer(kind)
    if not isinstance(config, config_cls):
        raise UserError(f"config is a {type(config).__name__}: expected a {config_cls.__name__} for {kind}")
    inputs = {input_files(uri)[0] for uri in (data, val) if uri is not None}  # fails fast on a missing input
    init_ray()
    datasets = build_datasets(data, val)
    t0 = time.perf_counter()
    # Reading Parquet starts with Ray Data's file-listing task, which takes a whole CPU (it takes no num_cpus); with
    # less than that left beside the workers the run waits forever. Folders of image files need only a read slot.
    free_cpus = 1.0 if "parquet" in inputs else READ_CPUS
    use_gpu, cpus_per_worker = train_resources(
        launch_config.workers, launch_config.gpu, launch_config.cpus_per_worker, free_cpus
    )
    run_uri = storage.join(launch_config.storage, launch_config.name)
    storage.ensure_bucket(launch_config.storage)
    config_json = json.dumps({"kind": kind, **dataclasses.asdict(config)}, indent=2, sort_keys=True)
    storage.write_bytes(storage.join(run_uri, "config.json"), config_json.encode())

    fs, root = storage.resolve(launch_config.storage)
    torch_trainer = TorchTrainer(
        loop,
        train_loop_config={**dataclasses.asdict(config), "cpus_per_worker": cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(
            num_workers=launch_config.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=launch_config.name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=launch_config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=launch_config.num_to_keep,
                checkpoint_score_attribute=config.score,
                checkpoint_score_order=config.score_order,
            ),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = torch_trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {launch_config.name!r} failed: {result.error}")
    best = result.get_best_checkpoint(config.score, config.score_order) or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {launch_config.name!r} left no checkpoint")
    with best.as_directory() as folder:
        model_bytes = (Path(folder) / "model.pt").read_bytes()
    model_uri = storage.join(run_uri, "model.pt")
    storage.write_bytes(model_uri, model_bytes)

    loaded = load_model(model_bytes, expected_kind=kind)
    history = sorted((dict(m) for _, m in (result.best_checkpoints or [])), key=lambda m: m["epoch"])
    return TrainReport(
        kind=kind,
        name=launch_config.name,
        model_path=model_uri,
        model_sha256=loaded.sha256,
        metrics={k: v for k, v in loaded.meta.get("metrics", {}).items()},
        history=history,
        seconds=time.perf_counter() - t0,
    )
