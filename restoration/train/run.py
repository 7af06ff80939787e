"""`restoration train KIND`: resolve a preset plus overrides into a train config, build the datasets, launch.

restoration train restorer --data s3://bucket/train400 --storage s3://bucket/runs --preset restorer-dncnn-cpu
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from restoration.train import dcgan, restorer, vae
from restoration.train.launcher import LaunchConfig, TrainReport, launch

# kind -> (train config class, presets, train_loop_per_worker). Explicit: adding a family is one line.
TRAINERS: dict[str, tuple[type, dict[str, dict], Any]] = {
    "restorer": (restorer.RestorerTrainConfig, restorer.PRESETS, restorer.train_loop_per_worker),
    "dcgan": (dcgan.DCGANTrainConfig, dcgan.PRESETS, dcgan.train_loop_per_worker),
    "vae": (vae.VAETrainConfig, vae.PRESETS, vae.train_loop_per_worker),
}
READ_CPUS = 0.5  # CPUs per read task: the workers may hold all but half a core (launcher.launch checks)


def parse_override(text: str, config_cls: type) -> tuple[str, Any]:
    """`field=value` -> (field, typed value), typed from the config dataclass's default."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE")
    name, raw = text.split("=", 1)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if name not in fields:
        raise ValueError(f"--set {name}: unknown field; expected one of {', '.join(fields)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as arch=fast
    return name, value


def resolve_config(kind: str, preset: str | None, overrides: dict[str, Any]) -> Any:
    """The train config of `kind` from a named preset (or the defaults) and field overrides.

    Returns:
        The frozen config dataclass; raises ValueError naming a bad preset, field or value.
    """
    if kind not in TRAINERS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {', '.join(TRAINERS)}")
    config_cls, presets, _ = TRAINERS[kind]
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {kind}: expected one of {', '.join(presets)}")
    values = {**(presets[preset] if preset else {}), **overrides}
    try:
        return config_cls(**values)
    except TypeError as e:
        raise ValueError(f"bad {kind} config: {e}") from None


def build_datasets(kind: str, data: str, val: str | None) -> tuple[dict, list[str]]:
    """Ray Datasets for a run: "train" (sharded across workers) and "val" (not split; rank 0 alone reads it): `val`,
    or without it the holdout of `data` (one image in 20, see `data.held_out`), which "train" then leaves out."""
    from restoration.data import read_images

    sources = {"train": (data, None if val else False), "val": (val, None) if val else (data, True)}
    datasets = {
        name: read_images(uri, extra_columns=("label",), num_cpus=READ_CPUS, holdout=holdout)
        for name, (uri, holdout) in sources.items()
    }
    return datasets, ["train"]


def run_training(
    kind: str, data: str, launch_config: LaunchConfig, train_config: Any, val: str | None = None
) -> TrainReport:
    """Train `kind` on the current Ray cluster (a local one when none is configured) and export its model file."""
    from restoration.cluster import init_ray
    from restoration.data import input_files

    kinds = {input_files(uri)[0] for uri in (data, val) if uri is not None}  # fails fast on a missing input
    init_ray()
    datasets, split = build_datasets(kind, data, val)
    _, _, loop = TRAINERS[kind]
    # Reading Parquet starts with Ray Data's file-listing task, which takes a whole CPU (it takes no num_cpus); with
    # less than that left beside the workers the run waits forever. Folders of image files need only a read slot.
    free_cpus = 1.0 if "parquet" in kinds else READ_CPUS
    return launch(kind, loop, train_config, launch_config, datasets, split, free_cpus=free_cpus)
