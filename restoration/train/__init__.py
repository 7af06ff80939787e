"""Training: every model family through one entry point, `launch`, which runs the family's loop under Ray Train.

    from restoration import train

    config = train.resolve_config("restorer", "restorer-dncnn-cpu", {"epochs": 2})
    report = train.launch("restorer", config, train.LaunchConfig("s3://bucket/runs", "dncnn"), "s3://bucket/train400")

- `launcher.py`: the driver: `TRAINERS` (kind -> config class, presets, loop), `resolve_config`, `dry_run`, `launch`.
- `worker.py`: what runs inside a Ray Train worker, shared by the families' loops.
- `restorer.py`, `upscaler.py`, `inpainter.py`, `dcgan.py`, `vae.py`: one family each: its train config, `PRESETS` and `train_loop_per_worker`.
- `restorer_core.py`, `gan_core.py`, `vae_core.py`, `patches.py`: the per-step maths in plain PyTorch (no Ray).
- `classifier.py`: the Fashion-MNIST classifier behind `restoration.fid`, trained in plain PyTorch.
"""

from restoration.train.launcher import (
    TRAINERS,
    LaunchConfig,
    TrainReport,
    dry_run,
    launch,
    parse_overrides,
    resolve_config,
)

__all__ = ["TRAINERS", "LaunchConfig", "TrainReport", "dry_run", "launch", "parse_overrides", "resolve_config"]
