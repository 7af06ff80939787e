"""Results as image files: each row's image written under the run folder at its key's relative path.

`restore --format files` (or `both`) and `restoration export` write `OUT/run_id=<id>/<key>` with the extension
changed to the format written (`a/b/photo.jpg` -> `a/b/photo.png`), so a folder in gives the same tree out. What a
user's key may not do, it cannot do here: a key that would leave the run folder (`..`, an absolute path, a backslash,
a drive letter), a hidden or reserved name, or two keys that map to one file name each become an error row, never a
file outside the folder and never an overwrite. Each file is written whole or not at all: on a local disk to a
temporary name beside it and renamed into place, on S3 as one PUT (an object appears only once complete). Writing
the same key again writes the same bytes to the same name, so a retried task or a resumed run never duplicates one.

Plain Python and Pillow: no Ray, no torch.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import uuid
from collections.abc import Iterable

from PIL import Image

from restoration import storage
from restoration.errors import UserError

FORMATS = ("parquet", "files", "both")  # what a run writes
IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # --image-format -> extension of the files
# Names the run folder keeps for itself (the rows of a files run, its error rows, the manifest, staging).
RESERVED = ("_rows", "_errors.parquet", "_manifest.json", "_staging", "_preview.png")
_DRIVE = re.compile(r"^[A-Za-z]:")


def check_options(output_format: str, image_format: str, quality: int) -> None:
    """Validate a run's `--format`, `--image-format` and `--quality`; ValueError names the bad value."""
    if output_format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"--quality must be an integer in 1..100, got {quality!r}")


class UnsafeKey(UserError):
    """A key that cannot name a file inside the run folder (the row's error says why)."""


def target_name(key: str, image_format: str = "png") -> str:
    """The file a row's image is written to, relative to the run folder: the key with its extension replaced.

    Args:
        key: the row's key, a relative POSIX path such as `scans/1931/page-04.tif`.
        image_format: one of IMAGE_FORMATS.
    Returns:
        The relative path, e.g. `scans/1931/page-04.png`.
    Raises:
        UnsafeKey: the key is empty, absolute, has a backslash, a drive letter, a NUL, an empty, `.` or `..` part, a
            hidden part (leading '.'), or starts with a name the run folder reserves.
    """
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"image_format={image_format!r}: expected one of {', '.join(IMAGE_FORMATS)}")
    if not key:
        raise UnsafeKey("empty key")
    if "\\" in key or "\x00" in key:
        raise UnsafeKey(f"key {key[:120]!r} has a backslash or NUL: expected a relative POSIX path")
    if key.startswith("/") or _DRIVE.match(key):
        raise UnsafeKey(f"key {key[:120]!r} is absolute: expected a path relative to the run folder")
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafeKey(f"key {key[:120]!r} has an empty, '.' or '..' part: it could leave the run folder")
        if part.startswith("."):
            raise UnsafeKey(f"key {key[:120]!r} has a hidden part {part[:60]!r}")
    if parts[0] in RESERVED or parts[0].startswith("_staging"):
        raise UnsafeKey(f"key {key[:120]!r} starts with {parts[0]!r}, a name the run folder keeps for itself")
    stem, ext = posixpath.splitext(parts[-1])
    name = stem if ext and stem else parts[-1]
    return posixpath.join(*parts[:-1], name + IMAGE_FORMATS[image_format])


def collisions(keys: Iterable[str], image_format: str = "png") -> dict[str, str]:
    """Keys that share their target file with another key (e.g. `a.jpg` and `a.png`, or one key twice).

    Returns:
        {key: the file name it shares}; every key of a clash is in it, so which one wins never depends on order.
    """
    names: dict[str, list[str]] = {}
    for key in keys:
        try:
            names.setdefault(target_name(key, image_format), []).append(key)
        except UnsafeKey:
            continue  # its own error row
    return {key: name for name, group in names.items() if len(group) > 1 for key in group}


def encode_as(png: bytes, image_format: str, quality: int = 95) -> bytes:
    """Re-encode a result PNG in `image_format`, keeping its colour profile (JPEG keeps no alpha or 16 bits: an
    image with alpha is refused, a 16-bit one is written at 8 bits; WebP keeps alpha).

    Args:
        png: the pipeline's PNG of the result.
        image_format: one of IMAGE_FORMATS; "png" returns `png` unchanged.
        quality: JPEG/WebP quality 1-100.
    Raises:
        ValueError: JPEG for an image with alpha.
    """
    if image_format == "png":
        return png
    with Image.open(io.BytesIO(png)) as im:
        icc = im.info.get("icc_profile")
        if im.mode in ("I;16", "I"):
            im = im.point(lambda v: v / 257).convert("L")  # 16-bit gray -> 8-bit, rounded down like Pillow's own
        if image_format == "jpeg" and im.mode in ("LA", "RGBA"):
            raise ValueError("the image has alpha, which JPEG cannot hold: use --image-format png or webp")
        out = io.BytesIO()
        kwargs = {"quality": int(quality)}
        if icc:
            kwargs["icc_profile"] = icc
        im.save(out, format="JPEG" if image_format == "jpeg" else "WEBP", **kwargs)
        return out.getvalue()


def write_file(uri: str, data: bytes) -> None:
    """Write `data` at `uri` whole or not at all: a temporary name in the same folder renamed into place on a local
    disk (a rename within a folder is atomic); one PUT on S3 (the object appears complete or not at all)."""
    if storage.is_s3(uri):
        storage.write_bytes(uri, data)
        return
    path = storage.resolve(uri)[1]
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_rows(
    rows: list[dict], run_uri: str, image_format: str, quality: int, clashes: dict[str, str], keep_image: bool
) -> list[dict]:
    """Write each ok row's image as a file under `run_uri`; set `file` (the relative path) on the rows written.

    A row whose key is unsafe or clashes, or whose write fails, becomes an error row ("files: <reason>"), with no
    file. With `keep_image` False the rows lose their image bytes (the files hold them).

    Args:
        rows: restore output rows (`key`, `image`, `error`, ...), changed in place and returned.
        run_uri: the run folder, local or s3://.
        image_format, quality: what to write (see `encode_as`).
        clashes: `collisions` of the run's keys.
        keep_image: keep `image` in the rows (`--format both`).
    """
    for row in rows:
        row["file"] = None
        if row.get("error") is None and row.get("image") is not None:
            try:
                if row["key"] in clashes:
                    raise UnsafeKey(f"{row['key'][:120]!r} and another key both map to {clashes[row['key']]}")
                name = target_name(row["key"], image_format)
                write_file(storage.join(run_uri, name), encode_as(row["image"], image_format, quality))
                row["file"] = name
            except (UnsafeKey, ValueError, OSError, storage.StorageError) as e:
                row["image"], row["error"] = None, f"files: {storage.redact(str(e))[:300]}"
        if not keep_image:
            row["image"] = None
    return rows


def export_run(run_uri: str, dest: str, image_format: str = "png", quality: int = 95) -> dict:
    """Write the images of a finished Parquet run (`OUT/run_id=<id>/`) as files under `dest`, keeping the keys' tree.

    Reads the run's Parquet files a row group at a time (bounded memory), writes `dest/<key with its extension
    changed>` for every ok row, then `dest/_errors.parquet` (the run's own error rows and any export failures, with
    key and reason) and `dest/_manifest.json` last. Files already in `dest` are written again (same bytes, same
    names), so an interrupted export is finished by running it again.

    Returns:
        {"run", "dest", "rows", "files", "errors", "image_format"}; also written as `dest/_manifest.json`.
    Raises:
        storage.StorageError: `run_uri` holds no Parquet rows, or is a run of `--format files` (already files).
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from restoration import data

    check_options("files", image_format, quality)
    fs, root = storage.resolve(run_uri)
    if storage.file_info(run_uri).type.name == "NotFound":
        raise storage.StorageError(f"run not found: {run_uri}")
    parts = [
        i.path
        for i in storage.list_files(run_uri)
        if i.path.endswith(".parquet")
        and not any(p.startswith(("_", ".")) for p in posixpath.relpath(i.path, root).split("/"))
    ]
    if not parts:
        raise storage.StorageError(f"{run_uri} holds no Parquet rows with images: expected a run folder of restore")
    keys = []
    for path in parts:
        with fs.open_input_file(path) as f:
            keys += pq.ParquetFile(f).read(columns=["key"]).column("key").to_pylist()
    clashes = collisions(keys, image_format)
    storage.ensure_bucket(dest)
    written, failed = 0, []
    for path in parts:
        with fs.open_input_file(path) as f:
            shard = pq.ParquetFile(f)
            for i in range(shard.num_row_groups):
                rows = shard.read_row_group(i, columns=["key", "image", "error"]).to_pylist()
                for row in write_rows(rows, dest, image_format, quality, clashes, keep_image=False):
                    if row["error"] is None:
                        written += 1
                    else:
                        failed.append({"key": row["key"], "error": row["error"]})
    errors = pa.Table.from_pylist(failed, schema=pa.schema([("key", pa.string()), ("error", pa.string())]))
    storage.write_bytes(storage.join(dest, "_errors.parquet"), data.table_to_parquet(errors))
    report = {"run": run_uri, "dest": dest, "rows": len(keys), "files": written, "errors": len(failed)}
    report["image_format"] = image_format
    storage.write_bytes(storage.join(dest, "_manifest.json"), json.dumps(report, indent=2).encode())
    return report
