"""Image sources, as lists of items that can be read one at a time: a folder (local or S3 prefix) of image files,
or the Fashion-MNIST idx files; and the local datasets that training, tests and benchmarks read whole into memory
(`load_images`, `read_fashion_mnist`, `datasets_dir`). No Ray and no torch here: the ingest writer and the readers
in `data.py` build on these.

An item is `(key, locator)`. Keys are stable — the path relative to the source root for files, `"{split}/{index:05d}"`
for idx records — so ingesting the same source twice gives the same keys in the same order.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import posixpath
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from restoration import storage
from restoration.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "RESTORATION_FASHION_MNIST"  # overrides FASHION_MNIST_DIR
FASHION_MNIST_SIZE = 28
DATASETS_ENV = "RESTORATION_DATASETS"  # overrides the default folder of Train400, Set12, LIVE1, Set5, Set14
# A developer's checkout has the shared datasets beside it; an installed package does not, and callers fall back.
DEFAULT_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# Lower-case suffixes read by `load_images`.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# ITU-R BT.601 luma, the gray of the denoising and super-resolution literature (and of Pillow's "L").
LUMA_601 = np.array([0.299, 0.587, 0.114], np.float32)
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


# --- Local datasets, read whole ----------------------------------------------------------------------------------


def datasets_dir(folder: str | os.PathLike | None = None) -> Path:
    """The folder holding Train400, Set12, LIVE1, Set5 and Set14: `folder`, else $RESTORATION_DATASETS, else
    `../shared/datasets` beside the checkout.

    Raises:
        UserError: a folder given (argument or variable) does not exist. The default may be missing (an installed
            package has none); callers then fall back to the sample photos.
    """
    chosen = folder if folder is not None else os.environ.get(DATASETS_ENV)
    if not chosen:
        return DEFAULT_DATASETS
    if not Path(chosen).is_dir():
        raise UserError(f"datasets folder {os.fspath(chosen)!r} (--datasets or ${DATASETS_ENV}) is not a directory")
    return Path(chosen)


def luma(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB floats -> (..., 1) ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), float32."""
    return (np.asarray(pixels, np.float32) @ LUMA_601)[..., None]


def image_paths(folder: str | Path) -> list[Path]:
    """Image files under a folder, recursively, in the order of their sorted relative paths."""
    folder = Path(folder)
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def image_to_float(image: Image.Image, channels: int) -> np.ndarray:
    """One opened image -> float32 (H, W, channels) in [0, 1]: EXIF orientation applied, gray by ITU-R 601 luma."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them, so scale here.
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        array = gray[:, :, None] if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
        return np.ascontiguousarray(array)
    # Pillow's "L" is the ITU-R 601-2 luma transform (LUMA_601), rounded to 8 bits as a gray file holds it.
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.reshape(array.shape[0], array.shape[1], channels))


def load_images(folder: str | Path, channels: int = 1, limit: int | None = None) -> list[np.ndarray]:
    """Read every image file under a folder (recursively) into memory.

    Args:
        folder: directory to search; files ending in .png, .jpg, .jpeg, .bmp, .tif or .tiff (any case) are read,
            in the order of `image_paths`.
        channels: 1 converts to gray (ITU-R 601 luma), 3 converts to RGB.
        limit: read at most this many files (the first ones in sorted order); None reads all.

    Returns:
        A list of float32 arrays of shape (H, W, channels) with values in [0, 1].
    """
    folder = Path(folder)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a directory")
    paths = image_paths(folder)
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {str(folder)!r}")
    images = []
    for path in paths[:limit]:
        with Image.open(path) as image:
            images.append(image_to_float(image, channels))
    return images


def fashion_mnist_folder(folder: str | os.PathLike | None = None) -> str:
    """The folder of the Fashion-MNIST idx files: `folder`, else $RESTORATION_FASHION_MNIST, else the Debian path."""
    if folder is not None:
        return os.fspath(folder)
    return os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR


@functools.lru_cache(maxsize=4)
def _read_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    hint = (
        f"install the dataset with `apt-get install dataset-fashion-mnist`, or point --fashion-mnist or "
        f"${FASHION_MNIST_ENV} at a folder holding the idx files"
    )
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Fashion-MNIST folder {folder} does not exist: {hint}")
    try:
        images_path, labels_path = IdxSource(folder, split).paths()
    except storage.StorageError as err:
        raise FileNotFoundError(f"Fashion-MNIST {split} split not found in {folder} ({err}): {hint}") from None
    images, labels = read_idx(images_path), read_idx(labels_path)
    size = FASHION_MNIST_SIZE
    if images.shape[1:] != (size, size) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{images_path} holds images {images.shape} and {labels_path} labels {labels.shape}: "
            f"expected (N, {size}, {size}) and (N,)"
        )
    return images, labels


def read_fashion_mnist(split: str, folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of Fashion-MNIST from its idx files (once per process; the arrays are shared, do not modify).

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        folder: the idx files' folder; None reads $RESTORATION_FASHION_MNIST or /usr/share/datasets/fashion-mnist.
    Returns:
        (images, labels): (N, 28, 28) uint8 and (N,) uint8 class indices.
    Raises:
        FileNotFoundError: naming the folder and how to install the dataset.
    """
    if split not in _IDX_FILES:
        raise ValueError(f"split={split!r}: expected one of {', '.join(_IDX_FILES)}")
    return _read_split(fashion_mnist_folder(folder), split)
