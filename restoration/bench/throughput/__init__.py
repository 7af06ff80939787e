"""`restoration bench throughput`: the pipelines against the raw models and a naive script, in one process.

Each section times a pipeline against the loop it cannot beat, on the same model file and the same work:
- restore (`restore.py`): the raw model loop (the limit) vs `run_restore` S3 -> Parquet on S3 (ours, end to end and
  in steady state) vs a naive one-image-at-a-time script;
- upscale (`restore.py` too): the same, with an upscaler on images without noise;
- synthesis (`synthesis.py`): the raw generator loop vs `run_synthesize`;
- training (`training.py`): a 1-worker Ray Train restorer vs the same loop in plain PyTorch.

Where the limit and a pipeline differ, the report says where the CPU went (`sampler.py`): a steady state below the
limit is either cores the model actors did not get or CPU they spent on more than the model. The work is sized so
that start-up costs do not dominate (`--min-model-seconds`, `work.py`). The run around the sections (S3, Ray) is
`harness.py`, its result `result.py`, the tables and notes `report.py`, the options `cli.py`. The training code the
training section measures is handed in by the command line (`training.Trainer`): benchmarks import none.
"""

from restoration.bench.throughput.cli import add_arguments, config_from_args, run
from restoration.bench.throughput.config import SECTIONS, ThroughputConfig
from restoration.bench.throughput.harness import benchmark
from restoration.bench.throughput.report import format_table, to_json, write_report
from restoration.bench.throughput.result import ThroughputResult
from restoration.bench.throughput.training import Trainer

__all__ = [
    "SECTIONS",
    "ThroughputConfig",
    "ThroughputResult",
    "Trainer",
    "add_arguments",
    "benchmark",
    "config_from_args",
    "format_table",
    "run",
    "to_json",
    "write_report",
]
