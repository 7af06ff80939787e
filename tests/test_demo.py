"""The README's first command: `make demo` runs `restoration demo` on embedded defaults. Run here as the installed
console command, in its own process (its own local Ray and its own embedded S3), exactly as a user runs it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from restoration import samples

pytestmark = pytest.mark.slow


def test_demo_ingests_restores_and_writes_a_contact_sheet(tmp_path):
    exe = shutil.which("restoration", path=str(Path(sys.executable).parent))
    assert exe, "the console script 'restoration' is installed with the package"
    proc = subprocess.run([exe, "demo", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(samples.SAMPLE_PHOTOS)
    assert f"ingested {n} images" in proc.stdout
    assert f"restored {n} ok, 0 errors of {n} rows" in proc.stdout
    manifest = json.loads((tmp_path / "run_id=demo" / "_manifest.json").read_text())
    assert manifest["rows_out"] == n and manifest["model"] == "denoise"
    gray = sum(1 for name in samples.SAMPLE_PHOTOS if name in samples.GRAY_PHOTOS)
    assert {k: v["rows"] for k, v in manifest["models"].items()} == {"denoise-gray": gray, "denoise-color": n - gray}
    # The bundled model really restores: a clear PSNR gain over the σ = 25 noisy input on real photos.
    assert manifest["mean_psnr"] > manifest["mean_input_psnr"] + 4.0
    table = pq.read_table(tmp_path / "run_id=demo")
    assert table.num_rows == n and table.column("error").null_count == n
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.mode == "RGB" and sheet.width > 600 and sheet.height > 600
    # Each bundled generator's own run: its summary line names its own run id (an f-string, so one generator's line
    # cannot pass for the other's), and its own preview grid was copied out, unlike the other's.
    lines = proc.stdout.splitlines()
    previews = {}
    for generator in ("dcgan-fmnist", "vae-fmnist"):
        summary = [line for line in lines if line.endswith(f"/run_id={generator}")]
        assert len(summary) == 1, (generator, proc.stdout[-3000:])
        assert re.fullmatch(
            rf"synthesized 64 images \(0 errors\) of 64 in .* -> s3://.*/run_id={generator}", summary[0]
        ), summary[0]
        preview = tmp_path / f"{generator}_samples.png"
        assert f"wrote {preview}" in lines
        with Image.open(preview) as grid:
            assert grid.width >= 8 * 28 and grid.height >= 8 * 28
            previews[generator] = np.asarray(grid.convert("L"))
    assert not np.array_equal(previews["dcgan-fmnist"], previews["vae-fmnist"])
