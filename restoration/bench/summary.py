"""What the benches' reports share: the machine's CPU name, JSON-ready values, and the lines a run prints at its end."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import platform
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def jsonable(value):
    """`value` as JSON-ready dicts and lists: a dataclass as its fields and then its properties (the figures derived
    from them), numpy scalars as Python numbers, non-finite floats as None, tuples and sets as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name, _ in inspect.getmembers(type(value), lambda member: isinstance(member, property)):
            out[name] = jsonable(getattr(value, name))
        return out
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a NamedTuple
        value = value._asdict()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    return value


def print_summary(table: str, notes: Iterable[str], wrote: Iterable[str | Path], wall_seconds: float) -> int:
    """Print the end of a bench run: its table, its notes, the wall time and the files it wrote.

    Returns:
        Exit status 0, for the bench's `run`.
    """
    print(table)
    for note in notes:
        print(f"note: {note}")
    print(f"wall time {wall_seconds:.1f} s; wrote {', '.join(str(p) for p in wrote)}")
    return 0
