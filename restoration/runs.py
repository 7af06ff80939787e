"""Run folders, shared by the restore and synthesis pipelines: staging, commit, resume, manifests, failures.

A run writes under `OUT/run_id=<id>/`. Ray Data writes an attempt's Parquet files under a staging prefix,
`OUT/_staging/run_id=<id>/<attempt>/`, outside the run folder (and hidden from Hive-style readers of OUT by its
leading '_'). Only when the whole write has succeeded are the files moved into the run folder (a rename on local
disks; copy-then-delete of whole objects on S3, which readers never see half-written), then the manifest is written.
So the run folder holds only complete files of finished attempts: a crashed actor's batch is retried by Ray and
written once (write tasks name their files by task, so a retried write replaces its own file), and an attempt that
fails for good (the store gone for longer than the retries last) commits nothing. `--resume` first discards what
failed attempts left in staging, then skips the rows already in the run folder, so each row is written once; the
manifests count `duplicates` to prove it.

No torch here; Ray only inside `write_attempt`, through the dataset it is given.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from restoration import data, schemas, storage
from restoration.cluster import DATA_TASK_CPUS, ClusterError
from restoration.errors import UserError


@dataclass(frozen=True)
class Run:
    """Where one run writes, and what earlier attempts of it already wrote."""

    run_id: str
    out_uri: str  # OUT/run_id=<id>
    rows_uri: str  # where its Parquet rows live (`rows_dir`)
    staging: str  # OUT/_staging/run_id=<id>
    done: frozenset  # values of the resume column already in the run folder (empty unless resuming)


def open_run(
    output: str, run_id: str | None, output_format: str, resume: bool, done_column: str, schema: pa.Schema
) -> Run:
    """Prepare run `run_id` (a new id when None) under `output`: create the bucket, refuse to overwrite a run without
    `resume`, read the `done_column` values a resumed run already holds, and discard what failed attempts left in
    staging (their rows are made again).

    Raises:
        UserError: the run folder exists and `resume` is off.
    """
    run_id = run_id or default_run_id()
    out_uri = run_dir(output, run_id)
    rows_uri = rows_dir(out_uri, output_format)
    storage.ensure_bucket(output)
    done: frozenset = frozenset()
    if resume:
        done = frozenset(read_output(rows_uri, [done_column], schema).column(done_column).to_pylist())
    elif storage.exists(out_uri):
        raise UserError(f"{out_uri} already exists: pass --resume to finish that run, or choose another --run-id")
    staging = staging_dir(output, run_id)
    remove_tree(staging)
    return Run(run_id, out_uri, rows_uri, staging, done)


def write_errors(out_uri: str, errors: pa.Table) -> None:
    """`_errors.parquet` (key and reason of every failed row) in the run folder: with `--format files`, beside the
    files, where a person looks for them."""
    storage.write_bytes(storage.join(out_uri, "_errors.parquet"), data.table_to_parquet(errors))


def write_manifest(out_uri: str, manifest: dict) -> None:
    """`_manifest.json`, written last: its presence says the run finished."""
    storage.write_bytes(storage.join(out_uri, "_manifest.json"), json.dumps(manifest, indent=2).encode())


def run_dir(output: str, run_id: str) -> str:
    return storage.join(output, f"run_id={run_id}")


def default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def read_output(uri: str, columns: list[str], schema: pa.Schema = schemas.RESTORE_OUTPUT_SCHEMA) -> pa.Table:
    """Read columns of a run's Parquet files (all files of the run folder; markers and anything under a name starting
    with '_' or '.' excluded); an empty table with the columns of `schema` when the run has written nothing yet."""
    fs, root = storage.resolve(uri)
    files = []
    if storage.file_info(uri).type.name != "NotFound":
        files = [
            i.path
            for i in storage.list_files(uri)
            if i.path.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in posixpath.relpath(i.path, root).split("/"))
        ]
    tables = [pq.read_table(f, filesystem=fs, columns=columns) for f in files]
    if not tables:
        return pa.table({c: pa.array([], schema.field(c).type) for c in columns})
    return pa.concat_tables(tables)


def rows_dir(out_uri: str, output_format: str) -> str:
    """Where a run's Parquet rows live: the run folder itself, or with `--format files` its `_rows/` (so that the
    run folder holds the images, `_errors.parquet` and `_manifest.json`, and the rows stay for resume and reports)."""
    return storage.join(out_uri, "_rows") if output_format == "files" else out_uri


def phase_seconds(start: float, write: float, commit: float, summary: float, end: float) -> dict[str, float]:
    """A run's `phase_seconds` from the `time.perf_counter()` readings at which each phase began, and the end."""
    return {"setup": write - start, "write": commit - write, "commit": summary - commit, "summary": end - summary}


def staging_dir(output: str, run_id: str) -> str:
    """Where the attempts of run `run_id` write before they commit: OUT/_staging/run_id=<id>/."""
    return storage.join(output, "_staging", f"run_id={run_id}")


def write_attempt(
    ds, staging: str, out_uri: str, kind: str, run_id: str, min_rows_per_file: int, concurrency: int | None = None
) -> tuple[float, float]:
    """Write `ds` as one attempt under `staging`, then commit its files into the run folder `out_uri`.

    The write reserves DATA_TASK_CPUS, at most `concurrency` tasks at once (`cluster.data_task_cap`), like the
    encoding operator before it, so the two fuse into one task (Ray Data fuses only equal reservations and caps).

    Returns:
        The `time.perf_counter()` readings at which the write and the commit began.
    Raises:
        storage.StorageError, ClusterError: the write failed for good (`run_failure`); nothing was committed.
    """
    attempt_uri = storage.join(staging, uuid.uuid4().hex[:12])
    attempt_fs, attempt_path = storage.resolve(attempt_uri)
    t_write = time.perf_counter()
    try:
        ds.write_parquet(
            attempt_path,
            filesystem=attempt_fs,
            min_rows_per_file=min_rows_per_file,
            ray_remote_args={"num_cpus": DATA_TASK_CPUS},
            concurrency=concurrency,
        )
    except Exception as e:  # a task failed for good: nothing of this attempt reaches the run folder
        raise run_failure(kind, run_id, e) from None
    t_commit = time.perf_counter()
    commit_staged(attempt_uri, out_uri)
    return t_write, t_commit


def commit_staged(attempt_uri: str, out_uri: str) -> None:
    """Move an attempt's finished Parquet files from `OUT/_staging/run_id=<id>/<attempt>/` into the run folder, then
    drop the run's staging folder (and, on a local disk, `OUT/_staging` once empty)."""
    fs, out_path = storage.resolve(out_uri)
    files = [i.path for i in storage.list_files(attempt_uri) if i.path.endswith(".parquet")]
    if not storage.is_s3(out_uri):
        fs.create_dir(out_path, recursive=True)
    for path in files:
        try:
            fs.move(path, posixpath.join(out_path, posixpath.basename(path)))
        except OSError as e:
            raise storage.StorageError(
                f"cannot commit {path} to {out_uri}: {storage.redact(str(e))}; rerun with --resume to finish the run"
            ) from None
    run_staging = attempt_uri.rstrip("/").rsplit("/", 1)[0]
    remove_tree(run_staging)
    if not storage.is_s3(out_uri):
        staging_root = Path(storage.resolve(run_staging)[1]).parent
        if staging_root.is_dir() and not any(staging_root.iterdir()):
            staging_root.rmdir()


def remove_tree(uri: str) -> None:
    """Delete a folder or prefix and everything under it (nothing when it does not exist)."""
    if storage.exists(uri):
        fs, path = storage.resolve(uri)
        fs.delete_dir(path)


def run_failure(kind: str, run_id: str, error: BaseException) -> Exception:
    """One line for a `kind` run ("restore", "synthesis") that stopped: the innermost cause (Ray wraps a task's
    exception in its own), redacted."""
    cause, seen = error, set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    # The task's own exception leads with its message (Ray Data appends retry advice on further lines); an exception
    # of Ray's own carries the task's name and traceback first and the wrapped "SomeError: message" line last.
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    if type(cause).__module__.startswith("ray."):
        named = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b[^:]*: ", line)]
        reason = named[-1] if named else f"{type(cause).__name__}: {lines[-1] if lines else ''}"
    else:
        reason = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    reason = storage.redact(reason)[:300]
    hint = "nothing of this attempt was committed; rerun with --resume to finish the run"
    if isinstance(cause, OSError):
        return storage.StorageError(f"{kind} run {run_id!r} stopped: the store failed: {reason}; {hint}")
    return ClusterError(f"{kind} run {run_id!r} stopped: a task failed for good: {reason}; {hint}")
