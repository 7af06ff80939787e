"""The GPU kit: one command on a lent GPU machine trains the full-size restorers, each under its own time budget, and
measures the restore pipeline against the raw model there; it leaves at most 8 files for the caller to keep.

    python scripts/device/kit.py --out DIR [--datasets DIR] [--total-s 510] [--dry-run]

`scripts/device/run.sh` calls it on the device machine, after unpacking the packages `scripts/device/prepare.sh`
carried; `run.sh --dry-run` calls it here on the CPU (tests/test_gpu_kit.py). docs/gpu.md says how to run it, what
comes back and how to bundle it.

Every stage runs in a process of its own under a wall-clock limit, so a stage that fails or hangs loses only itself:
- ray: whether a local Ray starts on this machine at all;
- throughput: `restoration bench throughput --only restore` on local folders (no S3 server there): the raw model
  loop against the pipeline, bf16 on a GPU, with the GPU's utilisation; without Ray, the raw loop alone;
- one per model of TRAIN_STAGES: `train.launch` (Ray Train, one worker, local storage) with `time_budget_s`, or,
  when Ray does not start or its run fails, `plain_train`, the same loop in one process without Ray.
The training stages share the time the earlier stages leave; each stage's budget is set when it starts.

DIR receives `<stage>.pt` for each model trained, `kit.json` (every stage's status, runner, figures and errors),
`kit.log` (every stage's output) and `throughput.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KIT_DIR = REPO / ".kit"
MAX_FILES = 8  # what one call of the device tool brings back: at most 8 files of at most 16 MiB each
MAX_FILE_BYTES = 16 * 2**20
LOG_BYTES_PER_STAGE = 2 * 2**20  # the end of each stage's output that goes into kit.log
FINAL_S = 10.0  # kept back at the end for kit.json and kit.log


@dataclass(frozen=True)
class TrainStage:
    """One model to train: a preset of `restoration.train.restorer.PRESETS` plus overrides, on a dataset folder."""

    name: str  # also the model file's name in DIR: NAME.pt
    preset: str
    data: str  # folder under the datasets
    val: str  # folder under the datasets, or COLOR_VAL
    overrides: dict = field(default_factory=dict)


COLOR_VAL = "color-samples"  # the 7 colour photos of scikit-image and scikit-learn (restoration.samples)

# The bundled restorers' families at their presets' full size. The presets' step counts are the caps; each run's
# time budget decides how much of them it does, and its schedule anneals within the budget (`worker.plan_epochs`).
TRAIN_STAGES = (
    # DnCNN-B (20 layers, 64 channels, batch 128 of 50x50, blind sigma 0-55): the preset's 50 x 1000 steps as
    # 100 x 500, so the budget is planned in epochs of a few seconds.
    TrainStage("denoise-gray-gpu", "denoise-gray-gpu", "Train400", "Set12", {"steps_per_epoch": 500, "epochs": 100}),
    TrainStage("denoise-color", "denoise-color-bf16", "LIVE1", COLOR_VAL),
    # The preset starts from the bundled `denoise-gray`, which is now a U-Net of another shape: start from the
    # bundled restore-gray instead (same architecture).
    TrainStage("restore-gray", "restore-gray-bf16", "Train400", "Set12", {"init_from": "restore-gray"}),
    # Starts from this kit's denoise-color when that stage made one (see `init_from`), else from the bundled one.
    TrainStage("restore-color", "restore-color-bf16", "LIVE1", COLOR_VAL),
)

# The dry run: every stage as above, at the same model sizes, on a few tiny batches, on the CPU.
DRY_OVERRIDES = dict(
    batch_size=2, patch_size=32, steps_per_epoch=2, epochs=50, bn_recalibration_batches=1, precision="fp32"
)
DRY_VAL_MAX_SIDE = 48

# The throughput stage on the GPU: noisy 256x256 crops of Set12 (256 distinct ones, repeated under new keys), as
# many as the raw model restores in half a second (--min-model-seconds 0.5: about 1,000-10,000 images on an H100 or
# H200), in batches of 32, the bundled denoise-gray in bf16, the naive script on 512 of them. Staging the images as
# files and ingesting them into shards (about 3 ms an image) takes longer than restoring them: hence half a second.
BENCH = dict(only=("restore",), count=256, size=256, batch_size=32, min_model_seconds=0.5, naive_count=512)
DRY_BENCH = dict(only=("restore",), count=8, size=64, batch_size=4, min_model_seconds=0.0, naive_count=2)


# ------------------------------------------------------------------------------------------------- stage bodies
def probe_ray(spec: dict) -> dict:
    """Start a local Ray and read its resources."""
    import ray

    from restoration.cluster import init_ray

    t0 = time.perf_counter()
    init_ray()
    try:
        return {"ray": ray.__version__, "resources": ray.cluster_resources(), "start_s": time.perf_counter() - t0}
    finally:
        ray.shutdown()


def train_config(spec: dict):
    from restoration import train

    return train.resolve_config("restorer", spec["preset"], spec["overrides"])


def train_with_ray(spec: dict) -> dict:
    """`restoration.train.launch` with one worker on local storage (the GPU when there is one)."""
    from restoration import train

    where = train.LaunchConfig(
        storage=spec["runs"], name=spec["name"], workers=1, gpu=spec["gpu"], max_failures=0, num_to_keep=None
    )
    report = train.launch("restorer", train_config(spec), where, spec["data"], spec["val"])
    return {"model_path": report.model_path, "history": report.history, "best": report.metrics}


def plain_train(spec: dict) -> dict:
    """The restorer's Ray Train loop without Ray, in this process on its default device: the same epoch, schedule,
    recalibration, validation, time budget and model file; the best epoch by the config's score is kept."""
    import numpy as np
    import torch

    from restoration.checkpoint import save_model
    from restoration.cluster import default_cpus_per_worker, threads_for
    from restoration.device import default_device
    from restoration.models.restorer import Restorer
    from restoration.sources import load_images
    from restoration.train.restorer import init_weights, recalibrate, train_epoch
    from restoration.train.restorer_core import NoiseSpec, evaluate_psnr
    from restoration.train.worker import plan_epochs

    started = time.perf_counter()
    cfg = train_config(spec)
    device = default_device()
    # The torch threads a Ray Train worker would get by default: more than the cores left free slow a CPU run down
    # many times over on a busy machine.
    torch.set_num_threads(threads_for(default_cpus_per_worker(os.cpu_count() or 1, 1, device.type == "cuda")))
    train_images = load_images(spec["data"], channels=cfg.channels)
    val_images = load_images(spec["val"], channels=cfg.channels) if spec["val"] else []

    # Build the model and optimizer.
    torch.manual_seed(cfg.seed)
    model = Restorer(cfg.model_config())
    if cfg.init_from:
        model.load_state_dict(init_weights(cfg.init_from, cfg.model_config()))
    if cfg.precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    run_dir = Path(spec["runs"], spec["name"])
    run_dir.mkdir(parents=True, exist_ok=True)
    history, best, planned = [], None, cfg.epochs
    for epoch in range(cfg.epochs):
        if epoch >= planned:
            break
        t0 = time.perf_counter()
        losses = train_epoch(model, optimizer, cfg, train_images, 0, epoch, device, epochs=planned)
        seconds = time.perf_counter() - t0
        recalibrate(model, cfg, train_images, (cfg.seed, 0, epoch), device)

        # Validate, keep the best model file.
        metrics = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": cfg.steps_per_epoch * cfg.batch_size / seconds,
            "epoch_seconds": seconds,
            "planned_epochs": planned,
            "val_psnr": float("nan"),
        }
        if val_images:
            val = evaluate_psnr(model, val_images, NoiseSpec(sigma=cfg.val_sigma), max_side=cfg.val_max_side)
            metrics.update(val_psnr=val["psnr"], val_psnr_input=val["psnr_input"])
        print(f"[plain] epoch {epoch + 1}/{planned} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        history.append(metrics)
        if best is None or _better(metrics, best, cfg.score, cfg.score_order):
            best = metrics
            meta = {"train_config": dataclasses.asdict(cfg), "epoch": epoch, "metrics": metrics}
            save_model(run_dir / "model.pt", "restorer", model.config, model, meta=meta)
        now = time.perf_counter()
        planned = plan_epochs(cfg, epoch + 1, now - started, now - t0)
    return {"model_path": str(run_dir / "model.pt"), "history": history, "best": best}


def _better(new: dict, old: dict, score: str, order: str) -> bool:
    a, b = new.get(score, math.nan), old.get(score, math.nan)
    if math.isnan(b):
        return True
    if math.isnan(a):
        return False
    return a > b if order == "max" else a < b


def bench_restore(spec: dict) -> dict:
    """The throughput benchmark's restore section on local folders; the raw loop alone when Ray is not there."""
    from restoration.bench import throughput

    config = throughput.ThroughputConfig(**spec["config"])
    if not spec["ray"]:
        return {"summary": raw_loop_only(config), "note": "Ray did not start: the raw model loop alone"}
    result = throughput.benchmark(config, progress=lambda line: print(f"[throughput] {line}", flush=True))
    throughput.write_report(result, config.out_dir)
    return {"summary": bench_summary(result), "result": throughput.to_json(result)}


def raw_loop_only(config) -> dict:
    """The benchmark's raw model loop (its `limit`) on the same work, without Ray."""
    import torch

    from restoration.bench.summary import jsonable
    from restoration.bench.throughput.restore import limit_batches, run_limit
    from restoration.bench.throughput.work import make_work
    from restoration.inference import RestoreActor

    noisy, _, origin = make_work(config)
    actor = RestoreActor(config.model, precision="auto").runner(1)
    batches = limit_batches(actor, noisy, config.batch_size)
    run_limit(actor, batches[:1], batches[0].images)  # warm-up
    limit = jsonable(run_limit(actor, batches, config.count))  # its fields and rates
    return {"source": origin, "model": config.model, "bf16": actor.bf16, "device": str(actor.device),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "raw": limit}  # fmt: skip


def bench_summary(result) -> dict:
    """The figures worth a line in the README, from the benchmark's `ThroughputResult`."""
    restore = result.restore
    limit, again, ours = restore.limit, restore.limit_again, restore.ours
    return {
        "gpu": result.environment.cuda,
        "model": result.config.model,
        "images": restore.images,
        "megapixels": restore.megapixels,
        "batch_size": result.config.batch_size,
        "actors": restore.pool.actors,
        "bf16": restore.runner.bf16,
        "raw_images_per_s": limit.images_per_s,
        "raw_mp_per_s": limit.mp_per_s,
        "raw_again_mp_per_s": again.mp_per_s,
        "pipeline_steady_images_per_s": ours.steady.rows_per_s,
        "pipeline_steady_mp_per_s": ours.steady.work_per_s,
        "pipeline_steady_valid": restore.steady_valid,
        "pipeline_end_to_end_mp_per_s": restore.end_to_end_mp_per_s,
        "pipeline_over_raw": restore.ratios["ours_steady_over_limit_mean"],
        "gpu_util_mean": ours.resources.gpu_util_mean,
        "gpu_util_max": ours.resources.gpu_util_max,
        "naive_mp_per_s": restore.naive.mp_per_s,
        "errors": ours.errors,
        "every_key_once": ours.every_key_once,
    }


STAGE_BODIES = {"probe": probe_ray, "train-ray": train_with_ray, "train-plain": plain_train, "bench": bench_restore}


def run_stage_here(spec_path: Path) -> int:
    """The body of one stage process: run it and write its result (or its error) as JSON."""
    spec = json.loads(spec_path.read_text())
    try:
        result = {"ok": True, **STAGE_BODIES[spec["body"]](spec)}
    except BaseException as e:  # noqa: BLE001 - recorded for kit.json, whatever it is
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:2000]}
    Path(spec["result"]).write_text(json.dumps(result, default=_json_default) + "\n")
    return 0 if result["ok"] else 1


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)


# ------------------------------------------------------------------------------------------------------ the driver
class Kit:
    """Runs the stages one after another within a deadline and collects what they leave."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.total_s
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="kit-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs: list[tuple[str, Path]] = []
        self.stages: list[dict] = []
        self.models: dict[str, Path] = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, line: str) -> None:
        print(f"[kit {time.perf_counter() - self.t0:6.1f}s] {line}", flush=True)

    def run(self, name: str, body: str, spec: dict, limit_s: float) -> dict:
        """Run one stage body in a process of its own (a session of its own, so that a stage that outlives
        `limit_s` is ended with every process it started, Ray's included). Returns its result JSON plus
        "status" (ok, failed, timeout), "seconds" and, on failure, "error"."""
        tag = f"{len(self.logs):02d}-{name}-{body}"
        spec_path, result_path, log_path = (self.work / f"{tag}.{ext}" for ext in ("spec.json", "result.json", "log"))
        spec_path.write_text(json.dumps({"name": name, **spec, "body": body, "result": str(result_path)}))
        self.logs.append((tag, log_path))
        env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}  # a Ray of its own, never another
        self.say(f"{name}: {body}, up to {limit_s:.0f} s")
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--stage", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=max(1.0, limit_s))
                status = None
            except subprocess.TimeoutExpired:
                status = "timeout"
            _end_session(proc)
        seconds = time.perf_counter() - t0
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        if status is None:
            status = "ok" if result.get("ok") else "failed"
        if status != "ok" and "error" not in result:
            reason = f"no result after {limit_s:.0f} s" if status == "timeout" else f"exit code {proc.returncode}"
            result["error"] = f"{reason}; the end of its output: {_tail(log_path, 1500)}"
        result.pop("ok", None)
        self.say(f"{name}: {status} in {seconds:.1f} s" + (f" ({result['error'][:300]})" if status != "ok" else ""))
        return {**result, "status": status, "seconds": round(seconds, 2)}

    # ---------------------------------------------------------------------------------------------- stages
    def stage_ray(self) -> bool:
        result = self.run("ray", "probe", {}, min(60.0, self.left()))
        self.stages.append({"name": "ray", "kind": "probe", **result})
        return result["status"] == "ok"

    def stage_bench(self, datasets: Path, ray_ok: bool) -> None:
        images = self.work / "bench-images"  # Set12 and Train400, as the benchmark's default source
        images.mkdir(exist_ok=True)
        for folder in ("Set12", "Train400"):
            for path in sorted((datasets / folder).glob("*")):
                _link(path, images / f"{folder}-{path.name}")
        config = {
            **(DRY_BENCH if self.args.dry_run else BENCH),
            "images": str(images),
            "local": str(self.work / "bench"),
            "out_dir": str(self.work / "bench-report"),
        }
        limit = min(self.args.bench_s, self.left() - FINAL_S)
        result = self.run("throughput", "bench", {"config": config, "ray": ray_ok}, limit)
        report = self.work / "bench-report" / "throughput.md"
        if report.exists():
            shutil.copyfile(report, self.out / "throughput.md")
        self.stages.append({"name": "throughput", "kind": "bench", "config": config, **result})

    def stage_train(self, stage: TrainStage, datasets: Path, ray_ok: bool, stages_left: int) -> None:
        """Train one model with the time this stage gets: an equal share of what is left."""
        slot = (self.left() - FINAL_S) / stages_left
        overrides = dict(stage.overrides)
        if self.args.dry_run:
            overrides.update(DRY_OVERRIDES, val_max_side=DRY_VAL_MAX_SIDE)
        if stage.name == "restore-color" and "denoise-color" in self.models:
            overrides["init_from"] = str(self.models["denoise-color"])  # this kit's, not the bundled one
        budget = self.args.budget_s or max(10.0, slot - self.args.overhead_s)
        overrides["time_budget_s"] = budget
        val = self.color_val() if stage.val == COLOR_VAL else str(datasets / stage.val)
        spec = {
            "preset": stage.preset,
            "overrides": overrides,
            "data": str(datasets / stage.data),
            "val": val,
            "runs": str(self.work / "runs"),
            "gpu": True if _cuda() else None,
        }
        record = {"name": stage.name, "kind": "train", "preset": stage.preset, "overrides": overrides, "val": val}
        if slot < 20.0:
            self.stages.append({**record, "status": "skipped", "error": f"{slot:.0f} s left for this stage"})
            return
        attempts = []
        with_ray = ray_ok and not ({"all", stage.name} & set(self.args.without_ray.split(",")))
        for runner in ("ray", "plain") if with_ray else ("plain",):
            limit = min(budget + self.args.overhead_s + 30.0, self.left() - FINAL_S)
            if attempts and limit < 20.0:
                break
            if attempts:  # the same run without Ray, with what is left of the slot
                spec["overrides"] = {**overrides, "time_budget_s": max(5.0, limit - self.args.overhead_s - 30.0)}
            result = self.run(stage.name, f"train-{runner}", {**spec, "name": f"{stage.name}-{runner}"}, limit)
            attempts.append({"runner": runner, "overrides": spec["overrides"], **result})
            if result["status"] == "ok":
                break
            if result["status"] == "timeout":  # a second try would not fit either
                break
        final = attempts[-1]
        record.update(final)
        record["runner"] = {"ray": "ray-train", "plain": "plain-pytorch"}[final["runner"]]
        if len(attempts) > 1:
            record["earlier_attempts"] = attempts[:-1]
        if final["status"] == "ok":
            model = Path(final["model_path"])
            self.models[stage.name] = model
            record["model_file"] = f"{stage.name}.pt"
            record["model_bytes"] = model.stat().st_size
        self.stages.append(record)

    def color_val(self) -> str | None:
        """The colour validation photos, copied once; None (the training data's holdout) when they are missing."""
        from restoration import samples

        folder = self.work / COLOR_VAL
        if not folder.exists():
            try:
                samples.copy_sample_photos(folder, samples.COLOR_PHOTOS)
            except (FileNotFoundError, ValueError) as e:
                self.say(f"colour validation photos missing ({e}); the training folder's holdout validates")
                return None
        return str(folder)

    # ------------------------------------------------------------------------------------------------ output
    def finish(self, datasets: Path) -> dict:
        """Copy the model files, write kit.json and kit.log, check what DIR holds."""
        for name, model in self.models.items():
            if model.stat().st_size <= MAX_FILE_BYTES:
                shutil.copyfile(model, self.out / f"{name}.pt")
        summary = {
            "kit": {
                "dry_run": self.args.dry_run,
                "wall_s": round(time.perf_counter() - self.t0, 1),
                "total_s": self.args.total_s,
                "datasets": str(datasets),
                "environment": environment(),
                "manifest": _manifest(),
            },
            "stages": self.stages,
        }
        names = sorted({p.name for p in self.out.iterdir()} | {"kit.json", "kit.log"})
        summary["files"] = names
        text = json.dumps(summary, indent=1, default=_json_default) + "\n"
        if len(text) > MAX_FILE_BYTES - 2**20:  # the benchmark's full result goes first; its summary stays
            for stage in self.stages:
                stage.pop("result", None)
            text = json.dumps(summary, indent=1, default=_json_default) + "\n"
        (self.out / "kit.json").write_text(text)
        self.write_log()
        files = sorted(self.out.iterdir())
        too_big = [p.name for p in files if p.stat().st_size > MAX_FILE_BYTES]
        if len(files) > MAX_FILES or too_big:
            raise SystemExit(f"{self.out} holds {len(files)} files (at most {MAX_FILES}), too big: {too_big}")
        return summary

    def write_log(self) -> None:
        with open(self.out / "kit.log", "wb") as out:
            for tag, path in self.logs:
                data = path.read_bytes() if path.exists() else b""
                cut = data[-LOG_BYTES_PER_STAGE:]
                out.write(f"===== {tag} ({len(data)} bytes{', the end' if len(cut) < len(data) else ''})\n".encode())
                out.write(cut + b"\n")


def environment() -> dict:
    """What this machine is: Python, torch, the GPU, Ray (or why it does not import)."""
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
    }
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError as e:
        env["ray"] = f"not importable: {e}"
    return env


def pack_datasets(source: Path, dest: Path, budget_bytes: int) -> dict:
    """Copy the kit's datasets into `dest` (prepare.sh): Train400 and Set12 as they are (PNG), LIVE1's BMPs as
    lossless WebP (`NAME.bmp.webp`, 40 % of the BMP's size; checked pixel for pixel), in name order for as long as
    the whole stays within `budget_bytes`.

    Returns:
        {"bytes": total, "folders": {name: {"files", "bytes"}}, "left_out": [LIVE1 files that did not fit]}.
    """
    import io

    import numpy as np
    from PIL import Image

    report: dict = {"bytes": 0, "folders": {}, "left_out": []}
    for name in ("Train400", "Set12", "LIVE1"):
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        entry = report["folders"].setdefault(name, {"files": 0, "bytes": 0})
        for path in sorted((source / name).iterdir()):
            if path.suffix.lower() == ".bmp":
                with Image.open(path) as image:
                    buf = io.BytesIO()
                    image.save(buf, format="WEBP", lossless=True, quality=100, method=4)
                    with Image.open(io.BytesIO(buf.getvalue())) as back:
                        if not np.array_equal(np.asarray(back.convert(image.mode)), np.asarray(image)):
                            raise ValueError(f"{path}: its lossless WebP does not decode to the same pixels")
                data, target = buf.getvalue(), folder / f"{path.name}.webp"
            else:
                data, target = path.read_bytes(), folder / path.name
            if report["bytes"] + len(data) > budget_bytes:
                if name != "LIVE1":
                    raise ValueError(f"{name} does not fit in {budget_bytes / 2**20:.1f} MiB")
                report["left_out"].append(path.name)
                continue
            target.write_bytes(data)
            entry["files"] += 1
            entry["bytes"] += len(data)
            report["bytes"] += len(data)
    return report


def prepare_datasets(source: Path, dest: Path) -> dict:
    """The datasets as the trainers read them: `NAME.EXT.webp` (lossless WebP, how prepare.sh packs BMPs) decoded back
    into `NAME.EXT`, pixel for pixel; every other file linked as it is. A file that fails is left out and named.

    Returns:
        {"folders": {dataset: files}, "problems": ["file: error", ...]}.
    """
    if not source.is_dir():
        raise FileNotFoundError(f"no datasets at {source}: run scripts/device/prepare.sh, or pass --datasets")
    dest.mkdir(parents=True, exist_ok=True)
    report: dict = {"folders": {}, "problems": []}
    for folder, _, names in os.walk(source, followlinks=True):  # a dataset may be a link to a folder
        for name in sorted(names):
            path = Path(folder, name)
            target = dest / path.relative_to(source)
            try:
                _restore(path, target)
            except Exception as e:  # noqa: BLE001 - one bad file costs only itself
                report["problems"].append(f"{path}: {type(e).__name__}: {e}")
                continue
            dataset = target.relative_to(dest).parts[0]
            report["folders"][dataset] = report["folders"].get(dataset, 0) + 1
    return report


def _restore(path: Path, target: Path) -> None:
    from PIL import Image

    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.suffixes[-2:-1] and path.suffix == ".webp":
        with Image.open(path) as image:
            image.save(target.with_suffix(""))  # the format of the remaining suffix, e.g. .bmp
    else:
        _link(path, target)


def _link(src: Path, dest: Path) -> None:
    if not dest.exists():
        dest.symlink_to(src.resolve())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _manifest() -> dict | None:
    path = KIT_DIR / "MANIFEST.json"
    return json.loads(path.read_text()) if path.exists() else None


def _tail(path: Path, chars: int) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:].strip() or "(none)"


def _end_session(proc: subprocess.Popen) -> None:
    """End a stage's process session: the stage, and Ray's processes if it left any."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the files to bring back (at most 8)")
    p.add_argument("--datasets", type=Path, default=None, help="Train400, Set12, LIVE1 (default: .kit/datasets)")
    p.add_argument("--work", default=None, help="working folder (default: a new one under the temp dir)")
    p.add_argument("--total-s", type=float, default=510.0, help="wall seconds for everything (default 510)")
    p.add_argument("--bench-s", type=float, default=150.0, help="most seconds for the throughput stage")
    p.add_argument("--overhead-s", type=float, default=40.0, help="a training stage's seconds beside its budget")
    p.add_argument("--budget-s", type=float, default=None, help="each model's training budget (default: a share)")
    p.add_argument("--only", default=None, help="training stages to run, comma-separated (default: all)")
    p.add_argument("--without-ray", default="", help="training stages to run without Ray, comma-separated, or all")
    p.add_argument("--dry-run", action="store_true", help="the CPU rehearsal: tiny batches, no GPU")
    p.add_argument("--pack", nargs=3, metavar=("SOURCE", "DEST", "BUDGET_BYTES"), help="pack datasets (prepare.sh)")
    p.add_argument("--stage", type=Path, default=None, help=argparse.SUPPRESS)  # one stage's process
    args = p.parse_args(argv)
    if args.stage is not None:
        return run_stage_here(args.stage)
    if args.pack:
        source, dest, budget = args.pack
        print(json.dumps(pack_datasets(Path(source), Path(dest), int(budget))))
        return 0
    if not args.out:
        p.error("--out is required")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, whatever this machine has
        # A rehearsal measures nothing: on a busy machine its stages may take minutes to start, and that is no failure.
        args.total_s, args.bench_s, args.overhead_s = max(args.total_s, 1800.0), max(args.bench_s, 600.0), 300.0
        args.budget_s = args.budget_s or 4.0
    stages = [s for s in TRAIN_STAGES if args.only is None or s.name in args.only.split(",")]

    kit = Kit(args)
    source, datasets = args.datasets or KIT_DIR / "datasets", kit.work / "datasets"
    try:
        report = prepare_datasets(source, datasets)
        status = "failed" if report["problems"] else "ok"
        kit.stages.append({"name": "datasets", "kind": "prepare", "source": str(source), "status": status, **report})
        kit.say(f"datasets from {source}: {report['folders']}; problems: {report['problems'] or 'none'}")
    except Exception as e:  # noqa: BLE001 - the stages that need them fail on their own, and say so
        datasets.mkdir(parents=True, exist_ok=True)
        kit.stages.append({"name": "datasets", "kind": "prepare", "status": "failed", "error": f"{e}"})
        kit.say(f"datasets: {e}")
    try:
        ray_ok = kit.stage_ray()
        kit.stage_bench(datasets, ray_ok)
        for i, stage in enumerate(stages):
            kit.stage_train(stage, datasets, ray_ok, len(stages) - i)
    except Exception as e:  # noqa: BLE001 - whatever happened, kit.json says it
        traceback.print_exc()
        kit.stages.append({"name": "kit", "kind": "driver", "status": "failed", "error": f"{type(e).__name__}: {e}"})
    summary = kit.finish(datasets)
    for stage in summary["stages"]:
        figures = stage.get("summary") or stage.get("best") or {}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in figures.items() if isinstance(v, float))
        kit.say(f"{stage['name']}: {stage['status']} {stage.get('runner', '')} {shown}".strip())
    kit.say(f"wrote {', '.join(summary['files'])} to {kit.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
