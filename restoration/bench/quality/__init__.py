"""`restoration bench quality`: the bundled restorers against BM3D and classical denoisers, gray and colour.

Every method sees the same degraded array and runs under the same thread limit; models run through
`ModelRunner.restore_array`, the code path of the production restore pipeline (tiling and channel adaptation
included). The protocol is the DnCNN/KAIR one (see DESIGN.md): clean image in [0, 1], noise N(0, sigma/255) added in
float with a seed fixed per (image, sigma), not clipped before the method; every output is clipped to [0, 1]; PSNR over
the whole image (all channels) with data range 1; SSIM from `restoration.metrics`.

`--task upscale` measures the bundled upscalers against nearest, bicubic and Lanczos on Set5/Set14 with the
super-resolution protocol instead (`upscale.py`: its own run, table and contact sheet).

The methods and their papers are in `methods.py`, the images in `images.py`, the run in `measure.py`, the tables and
the contact sheet in `report.py`, the options in `cli.py`.
"""

from restoration.bench.quality.cli import add_arguments, config_from_args, run
from restoration.bench.quality.config import QualityConfig, QualityResult
from restoration.bench.quality.images import load_benchmark_images
from restoration.bench.quality.measure import benchmark
from restoration.bench.quality.report import format_table, quality_sheet, write_report

__all__ = [
    "QualityConfig",
    "QualityResult",
    "add_arguments",
    "benchmark",
    "config_from_args",
    "format_table",
    "load_benchmark_images",
    "quality_sheet",
    "run",
    "write_report",
]
