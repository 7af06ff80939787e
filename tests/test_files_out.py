"""Folder in, folder out: `restore --format files|both`, `restoration export`, safe file names, colour profiles."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
from PIL import Image, ImageCms

from restoration import codec, data, files, storage
from restoration.checkpoint import save_model
from restoration.cli import main
from restoration.inference import ModelRunner
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.runs import read_output

# A real RGB ICC profile built by LittleCMS, standing in for the Display P3 profile a phone embeds: what is tested is
# that its bytes travel from the source file to every output, unchanged.
P3 = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def encoded(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("photo.jpg", "photo.png"),
        ("a/b/scan.tif", "a/b/scan.png"),
        ("noext", "noext.png"),
        ("dots.in.name.jpeg", "dots.in.name.png"),
        ("été/ñ.png", "été/ñ.png"),
    ],
)
def test_target_name_keeps_the_tree_and_changes_the_extension(key, expected):
    assert files.target_name(key) == expected
    assert files.target_name(key, "jpeg") == expected[: -len(".png")] + ".jpg"


@pytest.mark.parametrize(
    "key",
    ["", "../evil.png", "a/../../evil.png", "/etc/passwd", "a\\b.png", "C:/x.png", "a//b.png", "./a.png", ".hidden.png"]
    + ["a/.git/config", "_manifest.json", "_rows/part.parquet", "_staging/x.png", "nul\x00.png"],
)
def test_a_key_that_could_leave_or_spoil_the_run_folder_is_refused(key):
    with pytest.raises(files.UnsafeKey):
        files.target_name(key)


def test_collisions_name_every_key_of_a_clash():
    keys = ["a.png", "a.jpg", "b.png", "dir/c.png", "dir/c.webp", "dup.png", "dup.png", "../bad.png"]
    assert files.collisions(keys) == {
        "a.png": "a.png",
        "a.jpg": "a.png",
        "dir/c.png": "dir/c.png",
        "dir/c.webp": "dir/c.png",
        "dup.png": "dup.png",
    }


def test_icc_profile_survives_decode_and_every_encoder():
    rgb = skimage.data.astronaut()[:40, :48]
    source = encoded(rgb, "JPEG", quality=95, icc_profile=P3)
    decoded = codec.decode(source)
    assert decoded.icc_profile == P3
    png = codec.encode_png(decoded.pixels, icc_profile=decoded.icc_profile)
    assert Image.open(io.BytesIO(png)).info["icc_profile"] == P3
    for fmt in ("jpeg", "webp"):
        assert Image.open(io.BytesIO(files.encode_as(png, fmt))).info["icc_profile"] == P3, fmt
    # A profile that does not describe the decoded pixels is dropped: a CMYK source becomes RGB.
    cmyk = Image.fromarray(rgb).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", icc_profile=P3)
    assert codec.decode(buf.getvalue()).icc_profile is None
    # ... and a gray image with an RGB profile, too.
    assert codec.decode(encoded(rgb[..., 0], "PNG", icc_profile=P3)).icc_profile is None


def test_jpeg_refuses_alpha_and_webp_keeps_it():
    rgba = np.dstack([skimage.data.astronaut()[:16, :16], np.full((16, 16), 128, np.uint8)])
    png = encoded(rgba, "PNG")
    with pytest.raises(ValueError, match="alpha"):
        files.encode_as(png, "jpeg")
    assert Image.open(io.BytesIO(files.encode_as(png, "webp"))).mode == "RGBA"


def test_write_file_leaves_no_temporary_behind(tmp_path):
    files.write_file(str(tmp_path / "deep" / "tree" / "x.png"), b"abc")
    files.write_file(str(tmp_path / "deep" / "tree" / "x.png"), b"abcd")  # replaced whole
    assert (tmp_path / "deep" / "tree" / "x.png").read_bytes() == b"abcd"
    assert [p.name for p in (tmp_path / "deep" / "tree").iterdir()] == ["x.png"]


# --------------------------------------------------------------------------------------------------------- pipeline
def tree(root: Path) -> dict[str, bytes]:
    """A nested folder of mixed formats: 8-bit gray, RGB JPEG with a P3 profile, RGBA with alpha, 16-bit gray, two
    keys that map to one file name, and a broken file."""
    camera, astronaut = skimage.data.camera(), skimage.data.astronaut()
    items = {
        "gray.png": encoded(camera[:48, :64], "PNG"),
        "trip/day1/beach.jpg": encoded(astronaut[:40, :56], "JPEG", quality=92, icc_profile=P3),
        "trip/day1/logo.png": encoded(np.dstack([astronaut[:32, :32], camera[:32, :32]]), "PNG"),
        "scans/deep16.png": encoded((camera[:40, :40].astype(np.uint16) * 257), "PNG"),
        "scans/twin.png": encoded(camera[100:132, 100:132], "PNG"),
        "scans/twin.jpg": encoded(camera[200:232, 200:232], "JPEG"),
        "scans/broken.png": encoded(camera[:32, :32], "PNG")[:60],
    }
    for key, blob in items.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(blob)
    return items


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = Restorer(RestorerConfig(depth=3, width=8))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(path, "restorer", model.config, model)
    return str(path)


def expected_files(items: dict[str, bytes]) -> set[str]:
    return {files.target_name(k) for k in items if "twin" not in k and "broken" not in k}


def listing(run: str) -> dict[str, bytes]:
    """The run folder's files by relative path (S3 or local), hidden and reserved names excluded."""
    _, root = storage.resolve(run)
    out = {}
    for info in storage.list_files(run):
        rel = os.path.relpath(info.path, root)
        if not rel.startswith(("_", ".")):
            out[rel] = storage.read_bytes(storage.join(run, rel))
    return out


def check_files_run(run: str, items: dict[str, bytes], model_file: str) -> None:
    found = listing(run)
    assert set(found) == expected_files(items)
    runner = ModelRunner(model_file, precision="fp32")
    for key in ("gray.png", "trip/day1/beach.jpg", "trip/day1/logo.png", "scans/deep16.png"):
        got = Image.open(io.BytesIO(found[files.target_name(key)]))
        source = codec.decode(items[key])
        out = codec.decode(found[files.target_name(key)])
        assert (out.width, out.height, out.bit_depth) == (source.width, source.height, source.bit_depth), key
        assert (out.alpha is None) == (source.alpha is None), key
        if source.alpha is not None:
            np.testing.assert_array_equal(out.alpha, source.alpha)  # alpha kept as it was
        assert got.info.get("icc_profile") == source.icc_profile, key  # the P3 profile travelled
        expected = codec.to_uint(runner.restore_array(source.pixels[None])[0], source.bit_depth)
        assert np.abs(codec.to_uint(out.pixels, out.bit_depth).astype(int) - expected).max() <= 1, key
    assert Image.open(io.BytesIO(found["scans/deep16.png"])).mode == "I;16"  # 16-bit stays 16-bit
    errors = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(run, "_errors.parquet")))).to_pylist()
    reasons = {e["key"]: e["error"] for e in errors}
    assert set(reasons) == {"scans/twin.png", "scans/twin.jpg", "scans/broken.png"}
    assert reasons["scans/broken.png"].startswith("decode:")
    assert "both map to scans/twin.png" in reasons["scans/twin.jpg"]
    manifest = json.loads(storage.read_bytes(storage.join(run, "_manifest.json")))
    assert manifest["rows_in"] == len(items) and manifest["rows_out"] == len(items)  # every key accounted for
    assert manifest["ok"] + manifest["errors"] == len(items) and manifest["errors"] == 3
    assert manifest["config"]["format"] == "files"


@pytest.mark.slow
def test_a_folder_tree_round_trips_to_the_same_tree_and_resume_writes_each_file_once(ray_cluster, tmp_path, model_file):
    # One run id, two passes: a first run over a sub-folder of the tree writes part of it, and --resume over the whole
    # tree finishes it, writing only what is missing (the files already there are not written again). The finished
    # run is then the whole tree, as a run over all of it in one pass would leave it.
    items = tree(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["restore", str(tmp_path / "in"), str(out), "--model", model_file, "--precision", "fp32"]
    partial = tmp_path / "partial"
    (partial / "trip").mkdir(parents=True)
    os.rename(tmp_path / "in" / "trip", partial / "trip")
    assert main([*argv[:1], str(partial), *argv[2:], "--format", "files", "--run-id", "r2"]) == 0
    first = {p: p.stat().st_mtime_ns for p in (out / "run_id=r2").rglob("*.png")}
    assert {p.relative_to(out / "run_id=r2").as_posix() for p in first} == {
        "trip/day1/beach.png",
        "trip/day1/logo.png",
    }
    os.rename(partial / "trip", tmp_path / "in" / "trip")
    assert main([*argv, "--format", "files", "--run-id", "r2", "--resume"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # not rewritten
    check_files_run(str(out / "run_id=r2"), items, model_file)
    manifest = json.loads((out / "run_id=r2" / "_manifest.json").read_text())
    assert manifest["skipped_resumed"] == 2 and manifest["duplicates"] == 0
    assert not list(out.rglob("*.tmp")) and not (out / "_staging").exists()
    assert {p.name for p in (out / "run_id=r2").iterdir() if p.name.startswith("_")} == {
        "_rows",
        "_errors.parquet",
        "_manifest.json",
    }


@pytest.mark.slow
def test_hostile_keys_are_error_rows_and_nothing_lands_outside(ray_cluster, tmp_path, model_file):
    camera = skimage.data.camera()
    keys = ["ok/a.png", "../escape.png", "/abs.png", "back\\slash.png", "_manifest.json", "b/../../c.png"]
    table = pa.table({"key": keys, "image": [encoded(camera[:24, :24], "PNG")] * len(keys)})
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-0.parquet").write_bytes(data.table_to_parquet(table))
    out = tmp_path / "deep" / "out"
    argv = ["restore", str(tmp_path / "shards"), str(out), "--model", model_file, "--format", "both", "--run-id", "h"]
    assert main(argv) == 0
    # Nothing outside the run folder but the shards themselves.
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and "run_id=h" not in p.parts and "shards" not in p.parts]
    assert outside == []
    rows = {r["key"]: r for r in read_output(str(out / "run_id=h"), ["key", "image", "file", "error"]).to_pylist()}
    assert set(rows) == set(keys)
    assert rows["ok/a.png"]["file"] == "ok/a.png" and rows["ok/a.png"]["image"] is not None  # both: bytes and file
    assert (out / "run_id=h" / "ok" / "a.png").read_bytes() == rows["ok/a.png"]["image"]
    for key in keys[1:]:
        assert rows[key]["file"] is None and rows[key]["image"] is None, key
        assert rows[key]["error"].startswith("files: key"), rows[key]["error"]


@pytest.mark.slow
def test_files_on_s3_and_export_of_a_parquet_run(s3, ray_cluster, tmp_path, model_file):
    items = tree(tmp_path / "in")
    out = s3.uri("files-out", "restored")
    base = ["restore", str(tmp_path / "in"), out, "--model", model_file, "--precision", "fp32"]
    assert main([*base, "--format", "files", "--run-id", "s3"]) == 0
    check_files_run(storage.join(out, "run_id=s3"), items, model_file)

    # A Parquet run exported to files gives the same files, byte for byte.
    assert main([*base, "--run-id", "pq"]) == 0
    dest = s3.uri("files-out", "exported")
    assert main(["export", storage.join(out, "run_id=pq"), dest]) == 0
    assert listing(dest) == listing(storage.join(out, "run_id=s3"))
    manifest = json.loads(storage.read_bytes(storage.join(dest, "_manifest.json")))
    assert manifest == {
        "run": storage.join(out, "run_id=pq"),
        "dest": dest,
        "rows": len(items),
        "files": len(items) - 3,
        "errors": 3,
        "image_format": "png",
    }
    assert main(["export", storage.join(out, "run_id=pq"), str(tmp_path / "jpegs"), "--image-format", "jpeg"]) == 0
    jpeg = Image.open(tmp_path / "jpegs" / "trip" / "day1" / "beach.jpg")
    assert jpeg.format == "JPEG" and jpeg.info["icc_profile"] == P3
    assert (tmp_path / "jpegs" / "trip" / "day1" / "logo.jpg").exists() is False  # alpha: an error row instead
    errors = pq.read_table(tmp_path / "jpegs" / "_errors.parquet").to_pylist()
    assert any(e["key"] == "trip/day1/logo.png" and "alpha" in e["error"] for e in errors)


def test_bad_format_arguments_are_one_line(capsys, tmp_path):
    for flags, reason in ((["--format", "tiff"], "invalid choice: 'tiff'"), (["--quality", "0"], "1..100, got '0'")):
        with pytest.raises(SystemExit) as exit_:
            main(["restore", str(tmp_path), str(tmp_path / "o"), *flags])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], err  # one line naming the value and what was expected
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.strip() == f"restoration: error: run not found: {tmp_path / 'nothing'}"


@pytest.mark.slow
def test_synthesis_files_are_the_parquet_images_and_a_rerun_resumes(ray_cluster, tmp_path, gan_file):
    out = tmp_path / "gen"
    common = ["synthesize", "--model", gan_file, "--count", "12", "--seed", "3", "--out", str(out)]
    assert main([*common, "--run-id", "pq"]) == 0
    reference = {r["index"]: r["image"] for r in read_output(str(out / "run_id=pq"), ["index", "image"]).to_pylist()}
    assert main([*common, "--run-id", "f", "--format", "files"]) == 0
    run = out / "run_id=f"
    written = {p.name: p.read_bytes() for p in run.glob("*.png") if not p.name.startswith("_")}
    assert written == {f"{i:012d}.png": reference[i] for i in range(12)}  # the same PNGs, byte for byte
    assert (run / "_preview.png").exists() and pq.read_table(run / "_errors.parquet").num_rows == 0
    manifest = json.loads((run / "_manifest.json").read_text())
    assert manifest["rows_out"] == 12 and manifest["complete"] and manifest["config"]["format"] == "files"
    # A rerun with --resume of the finished run changes nothing.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main([*common, "--run-id", "f", "--format", "files", "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
