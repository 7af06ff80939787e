"""Ingest into Parquet shards on the embedded S3: folders, Fashion-MNIST idx, corrupt files."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from restoration import data, sources, storage


def read_shards(uri: str):
    fs, _ = storage.resolve(uri)
    tables = [pq.read_table(path, filesystem=fs) for path in data.shard_files(uri)]
    import pyarrow as pa

    return pa.concat_tables(tables)


def test_ingest_train400_is_complete_byte_identical_and_stable(train400, train400_shards):
    files = sorted(p for p in train400.rglob("*") if p.is_file())
    uri, first = train400_shards.uri, train400_shards.report  # the session's ingest, which test_train.py trains on
    assert first.rows == len(files) and not first.errors
    assert len(first.shards) > 1  # 2 MiB shards split the folder
    table = read_shards(uri)
    assert table.num_rows == len(files)
    by_key = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True))
    for path in files:
        assert by_key[path.relative_to(train400).as_posix()] == path.read_bytes()
    w, h = table.column("width").to_pylist()[0], table.column("height").to_pylist()[0]
    assert (w, h) == Image.open(files[0]).size
    # Shard sizes stay within the bound (plus the Parquet footer).
    for info in storage.list_files(uri):
        if info.path.endswith(".parquet"):
            assert info.size < 2 * 2**20 + 64 * 1024
    # Ingesting again gives the same keys in the same shards, byte for byte.
    before = {i.path: storage.read_bytes("s3://" + i.path) for i in storage.list_files(uri) if "part-" in i.path}
    data.ingest(str(train400), uri, shard_mb=2)
    after = {i.path: storage.read_bytes("s3://" + i.path) for i in storage.list_files(uri) if "part-" in i.path}
    assert before == after
    manifest = json.loads(storage.read_bytes(storage.join(uri, "_manifest.json")))
    assert manifest["rows"] == len(files) and manifest["errors"] == 0


def test_ingest_fashion_mnist_test_split_with_labels_through_ray(fashion_mnist, fmnist_test_shards):
    uri, report = fmnist_test_shards.uri, fmnist_test_shards.report  # ingested through Ray, shard_mb=1
    assert report.executor == "ray" and report.rows == 10_000 and not report.errors
    table = read_shards(uri).sort_by("key")
    assert table.num_rows == 10_000
    keys = table.column("key").to_pylist()
    assert keys[0] == "test/00000" and keys[-1] == "test/09999" and len(set(keys)) == 10_000
    labels = np.asarray(table.column("label").to_pylist())
    expected = sources.read_idx(str(fashion_mnist / "t10k-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(labels, expected)
    images = sources.read_idx(str(fashion_mnist / "t10k-images-idx3-ubyte.gz"), 0, 3)
    for i in range(3):
        decoded = np.asarray(Image.open(io.BytesIO(table.column("image")[i].as_py())))
        np.testing.assert_array_equal(decoded, images[i])


def make_corrupt_folder(folder: Path) -> dict[str, str]:
    """A folder with good images and the usual kinds of broken files. Returns the bad keys -> expected reason part."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    good.save(folder / "good.png")
    good.save(folder / "good.jpg", quality=90)
    (folder / "sub").mkdir()
    good.convert("L").save(folder / "sub" / "gray.png")
    png = io.BytesIO()
    good.save(png, format="PNG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "random.jpg").write_bytes(os.urandom(3000))
    return {"empty.png": "empty", "truncated.png": "truncated", "random.jpg": "not an image"}


def test_ingest_reports_corrupt_files_and_keeps_good_ones(s3, tmp_path):
    bad = make_corrupt_folder(tmp_path / "mixed")
    uri = s3.uri("ingest", "mixed")
    report = data.ingest(str(tmp_path / "mixed"), uri)
    assert report.rows == 3
    assert {k for k, _ in report.errors} == set(bad)
    for key, reason in report.errors:
        assert bad[key] in reason, (key, reason)
    table = read_shards(uri)
    assert sorted(table.column("key").to_pylist()) == ["good.jpg", "good.png", "sub/gray.png"]
    fs, path = storage.resolve(storage.join(uri, "_errors.parquet"))
    errors = pq.read_table(path, filesystem=fs)
    assert sorted(errors.column("key").to_pylist()) == sorted(bad)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_ingest_from_an_s3_prefix_matches_the_folder(s3, ray_cluster, tmp_path, executor):
    # The same mixed folder, uploaded as objects under an S3 prefix, ingests to the same keys, bytes and errors.
    bad = make_corrupt_folder(tmp_path / "mixed")
    prefix = s3.uri("ingest-src", f"photos-{executor}")
    for path in (tmp_path / "mixed").rglob("*"):
        if path.is_file():
            storage.write_bytes(
                storage.join(prefix, path.relative_to(tmp_path / "mixed").as_posix()), path.read_bytes()
            )
    uri = s3.uri("ingest", f"from-s3-{executor}")
    report = data.ingest(prefix, uri, executor=executor)
    assert report.executor == executor and report.rows == 3 and {k for k, _ in report.errors} == set(bad)
    table = read_shards(uri)
    images = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True))
    assert sorted(images) == ["good.jpg", "good.png", "sub/gray.png"]
    for key, image in images.items():
        assert image == (tmp_path / "mixed" / key).read_bytes(), key


def test_ingest_cli_reports_errors_and_bad_arguments(s3, tmp_path, capsys):
    from restoration.cli import main

    make_corrupt_folder(tmp_path / "mixed")
    assert main(["ingest", str(tmp_path / "mixed"), str(tmp_path / "out"), "--shard-mb", "1"]) == 0
    out = capsys.readouterr().out
    assert "error: empty.png: decode: empty file" in out and "ingested 3 images" in out
    assert main(["ingest", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert "input not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["ingest", str(tmp_path), str(tmp_path / "o"), "--shard-mb", "-3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-3" in err


def test_count_rows_reads_footers_and_counts_image_files(tmp_path):
    from PIL import Image

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(5):
        Image.new("L", (8 + i, 8), color=i * 40).save(src / f"{i}.png")
    (src / "_notes.txt").write_text("not an input")
    shards = tmp_path / "shards"
    data.ingest(str(src), str(shards), shard_mb=0.0001, executor="local")  # one image per shard
    assert len(list(shards.glob("*.parquet"))) > 1
    assert data.count_rows(str(shards)) == 5
    assert data.count_rows(str(src)) == 5
