"""Input shards: the ingest writer, and the Ray Data readers the pipelines and trainers use.

Shard contract (any Parquet with these columns is accepted as input):
    key: string (unique, stable), image: binary (encoded PNG/JPEG/...), width: int32, height: int32,
    label: int32 (labelled sources only), reference: binary (optional clean image for paired evaluation),
    mask: binary (optional encoded image, nonzero = missing, for inpainting).

In a folder (or S3 prefix) of images, `<name>_mask.png` beside `<name>.<ext>` is that image's mask (`pair_masks`): it
travels in the image's row (ingest writes it as the `mask` column) and is never an input row of its own; a mask with
no image beside it stays a row, with no image, so that the pipelines report it.

Ingest writes `DEST/part-00000.parquet, part-00001.parquet, ...` (each at most about `shard_mb`), then
`DEST/_errors.parquet` (key, reason) when some inputs were not readable images, then `DEST/_manifest.json` last.
A shard is built in memory and written with one PUT, so a reader never sees half a shard; the plan depends only on the
sorted source listing, so re-ingesting the same source rewrites byte-identical shards.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from restoration import codec, sources, storage
from restoration.errors import UserError

SHARD_SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32())])
LABELLED_SCHEMA = SHARD_SCHEMA.append(pa.field("label", pa.int32()))
MASKED_SCHEMA = SHARD_SCHEMA.append(pa.field("mask", pa.binary()))
MASK_SUFFIX = "_mask.png"
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string())])
_IDX_RECORD_BYTES = 28 * 28 + 100  # an upper bound for one Fashion-MNIST PNG, used to size idx shards
_AUTO_RAY_SHARDS = 4  # below this many shards, ingest runs in-process: starting Ray would cost more than it saves
# The most image bytes one Parquet row group of a shard holds, and the most one Ray Data read task takes (Ray Data packs
# row groups into read units of up to 128 MiB by default). A reader holds at least a row group, so this bounds its
# memory: with 4 MB shards of 256 x 256 crops, 2,560 images came as two 128 MiB read units, and the worker that read
# them peaked at 795 MB of private memory against 274 MB for 256 images.
ROW_GROUP_BYTES = 16 * 1024 * 1024
_BIN_BYTES_ENV = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"
_USER_BIN_BYTES = os.environ.get(_BIN_BYTES_ENV)
# Ray Data reads Parquet footers on a pool of FooterReader actors, 32 of them by default, each running 128 reads at a
# time. Each actor is a worker process to start (about 2.5 CPU s here), which on a 2-core machine was a third of the
# time before the first image reached the model. One actor per this many files; a value the user set wins.
FILES_PER_FOOTER_ACTOR = 10_000
_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_USER_FOOTER_ACTORS = os.environ.get(_FOOTER_ACTORS_ENV)


@dataclass(frozen=True)
class ShardPlan:
    """What goes into one shard: file items (folder/S3 sources) or an index range (idx sources)."""

    index: int
    items: tuple[sources.FileItem, ...] = ()
    start: int = 0
    stop: int = 0
    # Folder sources with masks: each item's mask path ("" for none; the item's own path for a mask with no image).
    masks: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"


@dataclass
class IngestReport:
    source: str
    dest: str
    rows: int = 0
    bytes: int = 0
    shards: list[dict] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    executor: str = "local"

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        mb_rate = self.bytes / 2**20 / self.seconds if self.seconds else 0.0
        return (
            f"ingested {self.rows} images ({self.bytes / 2**20:.1f} MiB) into {len(self.shards)} shards at "
            f"{self.dest} in {self.seconds:.1f} s ({rate:.0f} images/s, {mb_rate:.1f} MiB/s); "
            f"{len(self.errors)} errors"
        )


def pair_masks(paths: list[str]) -> tuple[list[str], dict[str, str]]:
    """Tell images from their masks: `<name>_mask.png` beside `<name>.<ext>` (any extension) is that image's mask.

    Args:
        paths: file paths (or keys) of a folder source, in order.
    Returns:
        (inputs, masks): the paths in order without the masks that have an image (a mask without one stays, so that
        it is reported), and image path -> its mask's path.
    """
    by_stem: dict[str, list[str]] = {}
    for path in paths:
        folder, _, name = path.rpartition("/")
        stem = name.rsplit(".", 1)[0] if "." in name else name
        by_stem.setdefault(f"{folder}/{stem}", []).append(path)
    masks, paired = {}, set()
    for path in paths:
        if path.endswith(MASK_SUFFIX):
            folder, _, name = path.rpartition("/")
            for image in by_stem.get(f"{folder}/{name[: -len(MASK_SUFFIX)]}", []):
                if image != path:
                    masks[image] = path
                    paired.add(path)
    return [p for p in paths if p not in paired], masks


def is_orphan_mask(path: str, masks: dict[str, str]) -> bool:
    """Whether `path`, an input of `pair_masks`, is a mask with no image beside it."""
    return path.endswith(MASK_SUFFIX) and path not in masks


def plan_ingest(src: str, shard_mb: float, split: str = "train") -> tuple[list[ShardPlan], bool]:
    """Split a source into shards of at most `shard_mb` MiB of image bytes.

    Returns:
        (plans, labelled): the shard plans in order, and whether rows carry labels.
    """
    if shard_mb <= 0:
        raise UserError(f"--shard-mb must be > 0, got {shard_mb}")
    limit = shard_mb * 2**20
    if sources.is_idx_folder(src):
        if split not in ("train", "test"):
            raise UserError(f"--split must be 'train' or 'test' for an idx source, got {split!r}")
        count = sources.IdxSource(src, split).count()
        per_shard = max(1, int(limit // _IDX_RECORD_BYTES))
        plans = [
            ShardPlan(i, start=s, stop=min(s + per_shard, count)) for i, s in enumerate(range(0, count, per_shard))
        ]
        return plans, True
    listed = sources.list_folder(src)
    inputs, mask_of = pair_masks([item.path for item in listed])
    kept = set(inputs)
    mask_path = {p: mask_of.get(p, p if is_orphan_mask(p, mask_of) else "") for p in inputs}
    plans, current, size = [], [], 0

    def plan(items: list) -> ShardPlan:
        masks = tuple(mask_path[i.path] for i in items) if any(mask_path.values()) else None
        return ShardPlan(len(plans), items=tuple(items), masks=masks)

    for item in listed:
        if item.path not in kept:
            continue
        if current and size + item.size > limit:
            plans.append(plan(current))
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        plans.append(plan(current))
    return plans, False


def build_shard(
    src: str, plan: ShardPlan, split: str = "train", max_pixels: int = codec.DEFAULT_MAX_PIXELS
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """Read and check every input of one shard plan.

    Returns:
        (table, errors): the rows that are readable images (original bytes, untouched), and `(key, reason)` for the rest.
    """
    if plan.items:
        fs, _ = storage.resolve(src)
        keys, images, widths, heights, masks, errors = [], [], [], [], [], []
        for item, mask_path in zip(plan.items, plan.masks or [""] * len(plan.items), strict=True):
            if mask_path == item.path:
                stem = posixpath.basename(item.path)[: -len(MASK_SUFFIX)]
                errors.append((item.key, f"mask: no image {stem}.* beside this mask"))
                continue
            try:
                with fs.open_input_stream(item.path) as f:
                    data = f.read()
                mask = None
                if mask_path:
                    with fs.open_input_stream(mask_path) as f:
                        mask = f.read()  # kept as it is: the pipeline that uses it checks it
            except OSError as e:
                errors.append((item.key, f"read: {storage.redact(str(e))[:200]}"))
                continue
            try:
                decoded = codec.decode(data, max_pixels=max_pixels)
            except codec.DecodeError as e:
                errors.append((item.key, f"decode: {e}"))
                continue
            keys.append(item.key)
            images.append(data)
            widths.append(decoded.width)
            heights.append(decoded.height)
            masks.append(mask)
        if plan.masks is not None:
            return pa.table([keys, images, widths, heights, masks], schema=MASKED_SCHEMA), errors
        table = pa.table([keys, images, widths, heights], schema=SHARD_SCHEMA)
        return table, errors
    rows = sources.idx_records(sources.IdxSource(src, split), plan.start, plan.stop)
    keys, images, labels, widths, heights = (list(col) for col in zip(*rows, strict=True)) if rows else ([],) * 5
    table = pa.table([keys, images, widths, heights, labels], schema=LABELLED_SCHEMA)
    return table, []


def table_to_parquet(table: pa.Table) -> bytes:
    """Serialise a table as one Parquet file in memory. Image bytes are already compressed: store them as they are."""
    buf = io.BytesIO()
    compression = {name: ("NONE" if name in ("image", "reference", "mask") else "ZSTD") for name in table.column_names}
    rows = max(1, min(1024, ROW_GROUP_BYTES * table.num_rows // max(table.nbytes, 1)))  # groups of <= ROW_GROUP_BYTES
    pq.write_table(table, buf, compression=compression, row_group_size=rows)
    return buf.getvalue()


def write_shard(src: str, dest: str, plan: ShardPlan, split: str, max_pixels: int) -> dict:
    """Build one shard and PUT it under `dest`. Returns its stats (name, rows, bytes, errors)."""
    table, errors = build_shard(src, plan, split, max_pixels)
    if table.num_rows:
        storage.write_bytes(storage.join(dest, plan.name), table_to_parquet(table))
    image_bytes = sum(len(b) for b in table.column("image").to_pylist()) if table.num_rows else 0
    return {"name": plan.name, "rows": table.num_rows, "bytes": image_bytes, "errors": errors}


def ingest(
    src: str,
    dest: str,
    shard_mb: float = 128.0,
    split: str = "train",
    executor: str = "auto",
    max_pixels: int = codec.DEFAULT_MAX_PIXELS,
) -> IngestReport:
    """Write the images of `src` as input shards under `dest`.

    Args:
        src: a local folder, an S3 prefix of image objects, or an idx folder (Fashion-MNIST).
        dest: local folder or S3 prefix for the shards.
        shard_mb: upper bound of image bytes per shard, in MiB.
        split: for idx sources, "train" or "test".
        executor: "local" (in this process), "ray" (one Ray Data task per shard, for large sources), or "auto".
        max_pixels: images larger than this are reported as errors, never decoded.

    Returns:
        An IngestReport; bad inputs are in `.errors` and in `dest/_errors.parquet`, never dropped silently.
    """
    if executor not in ("auto", "local", "ray"):
        raise UserError(f"--executor must be auto, local or ray, got {executor!r}")
    t0 = time.perf_counter()
    plans, _ = plan_ingest(src, shard_mb, split)
    if not plans:
        raise storage.StorageError(f"no files found under {src}")
    storage.ensure_bucket(dest)
    use_ray = executor == "ray" or (executor == "auto" and len(plans) >= _AUTO_RAY_SHARDS)
    report = IngestReport(source=src, dest=dest, executor="ray" if use_ray else "local")
    stats = (
        _run_ray(src, dest, plans, split, max_pixels) if use_ray else _run_local(src, dest, plans, split, max_pixels)
    )
    for s in sorted(stats, key=lambda s: s["name"]):
        report.rows += s["rows"]
        report.bytes += s["bytes"]
        report.errors.extend(s["errors"])
        if s["rows"]:
            report.shards.append({"name": s["name"], "rows": s["rows"], "bytes": s["bytes"]})
    _remove_stale(dest, keep={s["name"] for s in report.shards})
    if report.errors:
        errors = pa.table([[k for k, _ in report.errors], [r for _, r in report.errors]], schema=ERRORS_SCHEMA)
        storage.write_bytes(storage.join(dest, "_errors.parquet"), table_to_parquet(errors))
    report.seconds = time.perf_counter() - t0
    manifest = {k: v for k, v in asdict(report).items() if k != "errors"}
    manifest.update(errors=len(report.errors), shard_mb=shard_mb, split=split if sources.is_idx_folder(src) else None)
    storage.write_bytes(storage.join(dest, "_manifest.json"), json.dumps(manifest, indent=2).encode())
    return report


def _run_local(src, dest, plans, split, max_pixels) -> Iterator[dict]:
    for plan in plans:
        yield write_shard(src, dest, plan, split, max_pixels)


def _run_ray(src, dest, plans, split, max_pixels) -> Iterator[dict]:
    """One Ray Data row per shard plan; each task reads its inputs, writes its shard, and returns only small stats."""
    import ray

    from restoration.cluster import init_ray

    init_ray()
    by_index = {p.index: p for p in plans}

    def run(row: dict) -> dict:
        s = write_shard(src, dest, by_index[row["index"]], split, max_pixels)
        return {"name": s["name"], "rows": s["rows"], "bytes": s["bytes"], "errors": json.dumps(s["errors"])}

    ds = ray.data.from_items([{"index": p.index} for p in plans], override_num_blocks=len(plans))
    for row in ds.map(run).iter_rows():
        yield {**row, "errors": [tuple(e) for e in json.loads(row["errors"])]}


def _remove_stale(dest: str, keep: set[str]) -> None:
    """Delete shards and an error list that an earlier ingest left behind, so `dest` holds exactly this ingest."""
    fs, _ = storage.resolve(dest)
    for info in storage.list_files(dest, recursive=False):
        name = posixpath.basename(info.path)
        stale_shard = name.startswith("part-") and name.endswith(".parquet") and name not in keep
        if stale_shard or name == "_errors.parquet":
            fs.delete_file(info.path)


def shard_files(uri: str) -> list[str]:
    """The Parquet files of a shard folder, on the filesystem of `storage.resolve(uri)`, markers excluded."""
    fs, root = storage.resolve(uri)
    if fs.get_file_info(root).type.name == "File":
        return [root]
    files = [
        i.path
        for i in storage.list_files(uri)
        if i.path.endswith(".parquet") and not posixpath.basename(i.path).startswith(("_", "."))
    ]
    if not files:
        raise storage.StorageError(f"no Parquet shards under {uri}")
    return files


def input_files(uri: str) -> tuple[str, list[str]]:
    """What `uri` holds: ("parquet", files) for input shards, or ("images", files) for raw image objects.

    Hidden files and names starting with '_' (manifests, error lists) are never inputs.
    """
    fs, root = storage.resolve(uri)
    info = storage.file_info(uri)  # wrong credentials or an unreachable store: a StorageError naming the URI
    if info.type.name == "NotFound":
        raise storage.StorageError(f"input not found: {uri}")
    if info.type.name == "File":
        return ("parquet" if root.endswith(".parquet") else "images"), [root]
    files = [
        i.path
        for i in storage.list_files(uri)
        if not any(p.startswith((".", "_")) for p in posixpath.relpath(i.path, root).split("/"))
    ]
    if not files:
        raise storage.StorageError(f"no input files under {uri}")
    parquet = [f for f in files if f.endswith(".parquet")]
    return ("parquet", parquet) if parquet else ("images", files)


@dataclass(frozen=True)
class Input:
    """An input resolved once (one LIST of the store): what it holds and its files. `count_rows`, `input_keys`,
    `first_row` and `read_images` take one instead of a URI, so a run lists its input once."""

    uri: str
    kind: str  # "parquet" (input shards) or "images" (raw image objects)
    files: tuple[str, ...]  # image objects: without the masks that have an image (`pair_masks`)
    masks: tuple[tuple[str, str], ...] = ()  # image objects: (image path, its mask's path)


def resolve_input(uri: str | Input) -> Input:
    """`uri` listed (see `input_files`); an `Input` is returned as it is."""
    if isinstance(uri, Input):
        return uri
    kind, files = input_files(uri)
    if kind == "images" and len(files) > 1:
        files, masks = pair_masks(files)
        return Input(uri, kind, tuple(files), tuple(masks.items()))
    return Input(uri, kind, tuple(files))


def count_rows(uri: str | Input) -> int:
    """How many rows `read_images(uri)` yields, from the Parquet footers (or the file count), without running Ray.

    Args:
        uri: input shards or a folder/prefix of image files, as for `read_images`.
    Returns:
        The number of input rows.
    """
    src = resolve_input(uri)
    uri, kind, files = src.uri, src.kind, src.files
    if kind == "images":
        return len(files)
    fs, _ = storage.resolve(uri)
    total = 0
    for path in files:
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def input_keys(uri: str | Input) -> list[str]:
    """Every key `read_images(uri)` yields, read here without Ray: the `key` column of the shards (only that column
    is read), or the files' paths relative to `uri`."""
    src = resolve_input(uri)
    uri, kind, files = src.uri, src.kind, src.files
    fs, root = storage.resolve(uri)
    if kind == "images":
        base = _key_base(fs, root)
        return [f[len(base) + 1 :] for f in files]
    keys = []
    for path in files:
        with fs.open_input_file(path) as f:
            keys += pq.ParquetFile(f).read(columns=["key"]).column("key").to_pylist()
    return keys


def _key_base(fs, root: str) -> str:
    """The folder that image keys are relative to: `root` itself, or the folder of a single image file."""
    return root if fs.get_file_info(root).type.name == "Directory" else posixpath.dirname(root)


def first_row(uri: str | Input, extra_columns: tuple[str, ...] = ()) -> dict | None:
    """The first row `read_images(uri, extra_columns)` would yield, read here without Ray: {"key", "image", ...}.

    Reads one row group of the first shard (None when it has no rows), or the first image file (its key the path
    relative to `uri`).
    """
    src = resolve_input(uri)
    uri, kind, files = src.uri, src.kind, src.files
    fs, root = storage.resolve(uri)
    if kind == "parquet":
        with fs.open_input_file(files[0]) as f:
            shard = pq.ParquetFile(f)
            if shard.metadata.num_rows == 0:
                return None
            wanted = [c for c in ("key", "image", *extra_columns) if c in shard.schema_arrow.names]
            return shard.read_row_group(0, columns=wanted).slice(0, 1).to_pylist()[0]
    base = _key_base(fs, root)
    with fs.open_input_file(files[0]) as f:
        row = {"key": files[0][len(base) + 1 :], "image": f.read()}
    mask = dict(src.masks).get(files[0]) if "mask" in extra_columns else None
    if mask is not None:
        with fs.open_input_file(mask) as f:
            row["mask"] = f.read()
    return row


# Without a validation set, one image in HOLDOUT_EVERY (chosen by a CRC of its key) is held out of training.
HOLDOUT_EVERY = 20


def held_out(key: str) -> bool:
    """Whether the image `key` is in the validation holdout (the same keys on every run, machine and Python)."""
    return zlib.crc32(key.encode()) % HOLDOUT_EVERY == 0


def holdout_split(batch: pa.Table, held_out_rows: bool) -> pa.Table:
    """The rows of `batch` that are (`held_out_rows`) or are not in the validation holdout.

    It lives here, with nothing but pyarrow around it, because Ray Data's read tasks run it: a function defined
    next to the training loops would make every read worker import torch (about 2 CPU s per process).
    """
    mask = pa.array([held_out(k) == held_out_rows for k in batch.column("key").to_pylist()], pa.bool_())
    return batch.filter(mask) if batch.num_rows else batch


def read_images(
    uri: str | Input, extra_columns: tuple[str, ...] = (), num_cpus: float | None = None, holdout: bool | None = None
):
    """A Ray Dataset of `key`, `image` (encoded bytes) and those of `extra_columns` the input has.

    Args:
        uri: input shards (Parquet with the shard contract) or a folder/prefix of image files (keys: relative paths),
            or an `Input` already listed.
        extra_columns: optional shard columns to keep when present, e.g. ("reference",) or ("label",).
        num_cpus: CPUs each read task reserves (Ray's default is 1; training reads with less, so the read still
            finds a slot next to training workers that hold most of a small machine).
        holdout: True keeps only the validation holdout (`held_out`), False all but it, None everything. A folder
            is split by file name before anything is read, so the holdout of 1,000,000 files reads 50,000 of them;
            shards are split row by row as they are read.
    """
    import pyarrow.compute as pc
    import ray

    src = resolve_input(uri)
    uri, kind, files = src.uri, src.kind, list(src.files)
    fs, root = storage.resolve(uri)
    remote = {"num_cpus": num_cpus} if num_cpus is not None else {}
    if kind == "parquet":
        # Both are read by Ray Data in this process, when it plans the read.
        if _USER_FOOTER_ACTORS is None:
            os.environ[_FOOTER_ACTORS_ENV] = str(min(32, math.ceil(len(files) / FILES_PER_FOOTER_ACTOR)))
        if _USER_BIN_BYTES is None:
            os.environ[_BIN_BYTES_ENV] = str(ROW_GROUP_BYTES)
        ds = ray.data.read_parquet(files, filesystem=fs, **remote)
        names = ds.columns()
        missing = [c for c in ("key", "image") if c not in names]
        if missing:
            raise storage.StorageError(f"{uri}: Parquet input lacks column(s) {', '.join(missing)}; has {names}")
        ds = ds.select_columns(["key", "image", *(c for c in extra_columns if c in names)])
        if holdout is None:
            return ds
        return ds.map_batches(holdout_split, fn_kwargs={"held_out_rows": holdout}, batch_format="pyarrow", **remote)
    base = _key_base(fs, root)
    if holdout is not None:
        files = [f for f in files if held_out(f[len(base) + 1 :]) == holdout]
        if not files:
            return ray.data.from_arrow(pa.table({"key": pa.array([], pa.string()), "image": pa.array([], pa.binary())}))
    ds = ray.data.read_binary_files(files, filesystem=fs, include_paths=True, **remote)
    if "mask" in extra_columns:
        masks = {"start": len(base) + 1, "uri": uri, "masks": dict(src.masks)}
        return ds.map_batches(image_rows, fn_kwargs=masks, batch_format="pyarrow", **remote)
    return ds.map_batches(
        lambda t: pa.table({"key": pc.utf8_slice_codeunits(t["path"], len(base) + 1), "image": t["bytes"]}),
        batch_format="pyarrow",
        **remote,
    )


def image_rows(batch: pa.Table, start: int, uri: str, masks: dict[str, str]) -> pa.Table:
    """Rows `key`, `image`, `mask` of image objects as `read_binary_files` gives them (`path`, `bytes`).

    Args:
        start: where the key starts in a path (after the input folder and its '/').
        uri: the input, whose filesystem the masks are read from.
        masks: image path -> its mask's path (`pair_masks`). A mask travels in its image's row (b"" when it cannot be
            read, so that the row fails on it); a mask with no image is a row with the mask and no image.
    """
    fs, _ = storage.resolve(uri)
    images, mask_bytes = [], []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist(), strict=True):
        orphan = is_orphan_mask(path, masks)
        images.append(None if orphan else data)
        mask = data if orphan else None
        if path in masks:
            try:
                with fs.open_input_stream(masks[path]) as f:
                    mask = f.read()
            except OSError:
                mask = b""
        mask_bytes.append(mask)
    keys = [p[start:] for p in batch.column("path").to_pylist()]
    columns = {"key": (keys, pa.string()), "image": (images, pa.binary()), "mask": (mask_bytes, pa.binary())}
    return pa.table({name: pa.array(values, kind) for name, (values, kind) in columns.items()})
