"""The old import path of the training entry point, `restoration.train.launch`: kept only until
tests/test_reliability.py imports `restoration.train`; delete it then."""

from __future__ import annotations

from typing import Any

from restoration.train.launcher import LaunchConfig, TrainReport, launch, resolve_config

__all__ = ["resolve_config", "run_training"]


def run_training(
    kind: str, data: str, launch_config: LaunchConfig, train_config: Any, val: str | None = None
) -> TrainReport:
    """`launch(kind, train_config, launch_config, data, val)` under its old name and argument order."""
    return launch(kind, train_config, launch_config, data, val)
