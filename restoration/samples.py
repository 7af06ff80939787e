"""Sample photos for the demo and for checks on a machine without datasets: real photographs that ship inside
scikit-image (`skimage/data`) and scikit-learn (`sklearn/datasets/images`). Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

# name -> (package, file inside the package's data folder)
SAMPLE_PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "camera": ("skimage", "data/camera.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "coins": ("skimage", "data/coins.png"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "moon": ("skimage", "data/moon.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
GRAY_PHOTOS = ("camera", "coins", "moon")
COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "china", "flower")


def sample_photo(name: str) -> Path:
    """Path of one sample photo.

    Args:
        name: a key of SAMPLE_PHOTOS.

    Returns:
        The file inside the installed package.
    """
    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"unknown sample photo {name!r}: expected one of {', '.join(SAMPLE_PHOTOS)}")
    package, relative = SAMPLE_PHOTOS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"sample photo {name!r} needs {package}: pip install -e '.[dev]'")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"sample photo {name!r} not found at {path}")
    return path


def copy_sample_photos(folder: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Copy sample photos into `folder` under their own names (keeping the original encoded bytes).

    Returns:
        The copied files, in name order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in sorted(names or SAMPLE_PHOTOS):
        src = sample_photo(name)
        dest = folder / f"{name}{src.suffix}"
        shutil.copyfile(src, dest)
        out.append(dest)
    return out
