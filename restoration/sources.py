"""Image sources, as lists of items that can be read one at a time: a folder (local or S3 prefix) of image files,
or the Fashion-MNIST idx files. No Ray here: the ingest writer and the readers in `data.py` build on these.

An item is `(key, locator)`. Keys are stable — the path relative to the source root for files, `"{split}/{index:05d}"`
for idx records — so ingesting the same source twice gives the same keys in the same order.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from restoration import storage

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class FileItem:
    key: str
    path: str  # path on the source's filesystem
    size: int


@dataclass(frozen=True)
class IdxSource:
    """Fashion-MNIST (or MNIST) idx files: images (N, 28, 28) uint8 and labels (N,)."""

    folder: str
    split: str

    def paths(self) -> tuple[str, str]:
        images, labels = _IDX_FILES[self.split]
        return _find_idx(self.folder, images), _find_idx(self.folder, labels)

    def count(self) -> int:
        return read_idx_header(self.paths()[1])[0]


def is_idx_folder(src: str) -> bool:
    """Whether `src` is a local folder holding MNIST-style idx files."""
    if storage.is_s3(src) or not Path(src).is_dir():
        return False
    names = {p.name.removesuffix(".gz") for p in Path(src).iterdir()}
    return any(pair[0] in names for pair in _IDX_FILES.values())


def _find_idx(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise storage.StorageError(f"{stem}[.gz] not found in {folder}")


def _open_idx(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def read_idx_header(path: str) -> tuple[int, ...]:
    """The dimensions of an idx file (magic 0x00000801 labels, 0x00000803 images: big-endian int32 sizes)."""
    with _open_idx(path) as f:
        magic = struct.unpack(">I", f.read(4))[0]
        ndim = magic & 0xFF
        if magic >> 8 != 0x08:
            raise storage.StorageError(f"{path} is not an unsigned-byte idx file (magic {magic:#010x})")
        return struct.unpack(f">{ndim}I", f.read(4 * ndim))


def read_idx(path: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Records [start, stop) of an idx file, reading only as far as `stop`.

    Returns:
        uint8 array (stop - start, *record_shape).
    """
    dims = read_idx_header(path)
    stop = dims[0] if stop is None else min(stop, dims[0])
    record = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
    with _open_idx(path) as f:
        f.seek(4 + 4 * len(dims) + start * record)
        data = f.read((stop - start) * record)
    return np.frombuffer(data, dtype=np.uint8).reshape(stop - start, *dims[1:])


def idx_records(source: IdxSource, start: int, stop: int) -> list[tuple[str, bytes, int, int, int]]:
    """Records [start, stop) as `(key, png_bytes, label, width, height)`."""
    images_path, labels_path = source.paths()
    images = read_idx(images_path, start, stop)
    labels = read_idx(labels_path, start, stop)
    rows = []
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        rows.append((f"{source.split}/{start + i:05d}", buf.getvalue(), int(label), pixels.shape[1], pixels.shape[0]))
    return rows


def list_folder(src: str) -> list[FileItem]:
    """Every file under a folder or S3 prefix, as items keyed by relative path.

    Returns:
        Items in path order. Hidden files and files whose name starts with '_' (markers, manifests) are left out;
        every other file is an item, and one that is not an image is reported when it is decoded.
    """
    fs, root = storage.resolve(src)
    info = fs.get_file_info(root)
    if info.type.name == "NotFound":
        raise storage.StorageError(f"input not found: {src}")
    if info.type.name == "File":  # a single file: its key is its name
        return [FileItem(posixpath.basename(root), root, info.size)]
    items = []
    for f in storage.list_files(src):
        key = posixpath.relpath(f.path, root)
        if any(part.startswith((".", "_")) for part in key.split("/")):
            continue
        items.append(FileItem(key, f.path, f.size))
    return items
