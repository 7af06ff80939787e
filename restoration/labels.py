"""Class labels of conditional generators: the classes a run asks for, by id, and each row's class (no torch)."""

from __future__ import annotations

import numpy as np

from restoration.errors import UserError


def label_ids(labels: tuple[tuple[str, int], ...], known: tuple[str, ...], model: str) -> list[tuple[int, int]]:
    """The classes asked for, by the model's class ids: (id, count) in order.

    Args:
        labels: (class name or id as text, count) pairs, e.g. from `--labels sneaker:10000,7:5`.
        known: the model's class names, index = id (empty for an unconditional model).
        model: what errors call the model.
    Returns:
        [(class id, count), ...]; raises UserError, in one line naming the known classes, for a class the model
        does not know, and for labels with an unconditional model or none with a conditional one.
    """
    if not known:
        if labels:
            raise UserError(f"{model} is not class-conditional: it takes no --labels/--label")
        return []
    names = ", ".join(f"{i}={name}" for i, name in enumerate(known))
    if not labels:
        raise UserError(f"{model} is class-conditional: say what to make with --labels NAME:COUNT,... ({names})")
    ids = []
    for name, count in labels:
        i = int(name) if name.isdigit() else known.index(name) if name in known else -1
        if not 0 <= i < len(known):
            raise UserError(f"{model} has no class {name!r}: expected one of {names}")
        ids.append((i, count))
    if len({i for i, _ in ids}) != len(ids):
        raise UserError(f"--labels names a class twice (by name and by id): {', '.join(name for name, _ in labels)}")
    return ids


def check_labels(config, known: tuple[str, ...], model: str) -> list[tuple[int, int | None]]:
    """The classes a run asks for (`label_ids`), by mode: sample mode's (id, count) list; interpolation between
    labels' two (id, None); none for the modes that start from input images, which a conditional VAE does not serve
    (its encoder needs each image's class). Raises UserError in one line.

    Args:
        config: the run's `SynthesizeConfig`.
        known: the model's class names (empty for an unconditional model).
        model: what errors call the model.
    """
    if config.mode == "sample" or config.labels:
        return label_ids(config.labels, known, model)
    if known:
        raise UserError(
            f"{model} is class-conditional: --mode {config.mode} of input images needs an unconditional VAE "
            "(a conditional one moves between classes with --mode interpolate --labels A,B)"
        )
    return []


def row_labels(ids: list[tuple[int, int]], indices: list[int]) -> list[int] | None:
    """Class id of each row index when the classes `ids` ((id, count), in order) are laid out in index order; None
    for an unconditional run."""
    if not ids:
        return None
    stops = np.cumsum([count for _, count in ids])
    return [ids[j][0] for j in np.searchsorted(stops, indices, side="right").tolist()]
