"""The denoiser training campaign: a long, resumable, low-priority training run, and the bake-off that chooses it.

    nice -n 19 python scripts/campaign.py run --dir ~/campaign --name unet-d4-w32 \
        --set arch=unet --set depth=4 --set width=32 [--cpu-budget 1200] [--threads 1]
    python scripts/campaign.py report --dir ~/campaign          # PSNR against CPU-hours, per run; docs/ plot

A run whose folder is gone (a new machine) can go on from its bundled model with `--init FILE`: the weights,
step and CPU seconds come from the model file, Adam starts afresh.

Each run lives in `DIR/NAME/`: `state.pt` (model, Adam, step, CPU seconds: resumed by starting the same name
again), `log.jsonl` (one line per validation: step, CPU seconds, wall seconds, Set12 PSNR at sigma 15/25/50) and
`best.pt`, a model file (`restoration.checkpoint`) of the best validation so far, which `restore --model PATH`
loads and `scripts/bundle_restorer.py` bundles.

Training is blind Gaussian denoising (sigma ~ U[0, 55] per patch, as DnCNN-B) on Train400 with the eight dihedral
augmentations, Adam at a constant learning rate until `--decay-at` CPU-hours, then halved every `--decay-every`
CPU-hours (a schedule that needs no end point, because a campaign has none). Validation: Set12 central 256x256
crops, noise added in float with a fixed seed (the benchmark's protocol on smaller crops), every `--val-every` CPU
seconds. The budget counts the process's CPU time (user + system), not wall time, so runs that shared the machine
with other work compare fairly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from restoration.checkpoint import load_model, save_model
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.sources import datasets_dir, load_images
from restoration.train.patches import PatchSampler
from restoration.train.restorer_core import NoiseSpec, add_noise, evaluate_psnr

DATASETS = datasets_dir()
VAL_SIGMAS = (15, 25, 50)


def parse_sets(pairs: list[str]) -> dict:
    """`--set arch=unet --set depth=4` -> {"arch": "unet", "depth": 4} (ints and bools parsed)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"campaign: --set {pair!r}: expected FIELD=VALUE")
        if value in ("true", "false"):
            out[key] = value == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
    return out


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def lr_at(args: argparse.Namespace, cpu_hours: float) -> float:
    if cpu_hours < args.decay_at:
        return args.lr
    return args.lr * 0.5 ** (1 + int((cpu_hours - args.decay_at) // args.decay_every))


def validate(model: torch.nn.Module, images: list[np.ndarray], autocast) -> dict[str, float]:
    out = {}
    with autocast():
        for sigma in VAL_SIGMAS:
            out[f"psnr{sigma}"] = round(
                evaluate_psnr(model, images, NoiseSpec(sigma=sigma), seed=0, max_side=256)["psnr"], 3
            )
    return out


def init_from(model: torch.nn.Module, config: RestorerConfig, source: str) -> tuple[int, float, float]:
    """Load a model file's weights into `model`; return the (step, CPU s, wall s) it records, so the schedule and
    the curve go on from there. The optimizer starts afresh: a model file carries no Adam state."""
    loaded = load_model(source, expected_kind="restorer")
    if loaded.config != config:
        raise SystemExit(f"campaign: --init {source} holds {loaded.config}, not {config}")
    model.load_state_dict(loaded.module.state_dict())
    meta = loaded.meta or {}
    return int(meta.get("step", 0)), float(meta.get("cpu_seconds", 0.0)), float(meta.get("wall_seconds", 0.0))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    folder = Path(args.dir) / args.name
    folder.mkdir(parents=True, exist_ok=True)
    config = RestorerConfig(channels=1, **parse_sets(args.set))
    model = Restorer(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    state_path = folder / "state.pt"
    step, cpu_done, wall_done, best = 0, 0.0, 0.0, -1.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if state["config"] != dataclasses.asdict(config):
            raise SystemExit(f"campaign: {state_path} holds {state['config']}, not {dataclasses.asdict(config)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, cpu_done, wall_done, best = state["step"], state["cpu_seconds"], state["wall_seconds"], state["best"]
        print(f"resumed {args.name} at step {step}, {cpu_done / 3600:.2f} CPU-h, best {best:.3f} dB", flush=True)
    else:
        if args.init:
            step, cpu_done, wall_done = init_from(model, config, args.init)
            print(f"started {args.name} from {args.init} (step {step}, {cpu_done / 3600:.2f} CPU-h before)", flush=True)
        (folder / "config.json").write_text(json.dumps({"model": dataclasses.asdict(config), **vars(args)}, indent=1))

    bf16 = args.precision == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    train = load_images(DATASETS / "Train400", channels=1)
    val = load_images(DATASETS / "Set12", channels=1)
    sampler = PatchSampler(train, args.patch_size, np.random.default_rng([args.seed, step]))
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    noise = NoiseSpec(sigma=None, sigma_range=(0.0, 55.0))

    def checkpoint() -> None:
        state = {
            "config": dataclasses.asdict(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "cpu_seconds": cpu_done,
            "wall_seconds": wall_done,
            "best": best,
        }
        tmp = folder / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, state_path)

    cpu_mark, wall_mark, next_val = cpu_seconds(), time.perf_counter(), cpu_done + args.val_every
    model.train()
    while args.cpu_budget is None or cpu_done < args.cpu_budget:
        lr = lr_at(args, cpu_done / 3600)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clean = torch.from_numpy(sampler.sample(args.batch_size))  # (B, 1, p, p)
        noisy = add_noise(clean, noise, generator)
        if bf16:
            clean, noisy = clean.to(memory_format=torch.channels_last), noisy.to(memory_format=torch.channels_last)
        with autocast():
            loss = torch.nn.functional.mse_loss(model(noisy).float(), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        now_cpu, now_wall = cpu_seconds(), time.perf_counter()
        cpu_done += now_cpu - cpu_mark
        wall_done += now_wall - wall_mark
        cpu_mark, wall_mark = now_cpu, now_wall
        if cpu_done >= next_val or (args.cpu_budget is not None and cpu_done >= args.cpu_budget):
            scores = validate(model, val, autocast)  # not counted in the budget
            model.train()
            record = {"step": step, "cpu_s": round(cpu_done, 1), "wall_s": round(wall_done, 1), "lr": lr, **scores}
            with open(folder / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            if scores["psnr25"] > best:
                best = scores["psnr25"]
                export = Restorer(config)
                export.load_state_dict(model.state_dict())
                meta = {"campaign": args.name, "step": step, "cpu_seconds": round(cpu_done), **scores}
                save_model(folder / "best.pt", "restorer", config, export.eval(), meta=meta)
            checkpoint()
            cpu_mark, wall_mark = cpu_seconds(), time.perf_counter()
            next_val = cpu_done + args.val_every
    checkpoint()
    return 0


def plot(rows: list, path: str, size: tuple[int, int] = (720, 420)) -> None:
    """Set12 sigma-25 PSNR against CPU-hours, one line per run, drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    w, h = size
    left, right, top, bottom = 60, 20, 20, 50
    xs = [r["cpu_s"] / 3600 for _, records, _, _ in rows for r in records]
    ys = [r["psnr25"] for _, records, _, _ in rows for r in records]
    x_max, y_lo, y_hi = max(xs) * 1.02, math.floor(min(ys)), math.ceil(max(ys))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (w - left - right) * x / x_max, h - bottom - (h - top - bottom) * (y - y_lo) / (y_hi - y_lo)

    for y in range(y_lo, y_hi + 1):  # gridlines every dB
        draw.line([at(0, y), at(x_max, y)], fill="#dddddd")
        draw.text((8, at(0, y)[1] - 6), f"{y} dB", fill="black")
    for i in range(6):
        x = x_max * i / 5
        draw.text((at(x, y_lo)[0] - 10, h - bottom + 6), f"{x:.2f}", fill="black")
    draw.text((w // 2 - 150, h - 22), "CPU-hours (process CPU time); Set12 sigma 25, 256 crops", fill="black")
    for i, (name, records, _, _) in enumerate(rows):
        colour = colours[i % len(colours)]
        points = [at(r["cpu_s"] / 3600, r["psnr25"]) for r in records]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((left + 10, top + 14 * i), name, fill=colour)
    image.save(path)


def report(args: argparse.Namespace) -> int:
    rows = []
    for log in sorted(Path(args.dir).glob("*/log.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if not records:
            continue
        best = max(records, key=lambda r: r["psnr25"])
        last = records[-1]
        rows.append((log.parent.name, records, best, last))
        print(
            f"{log.parent.name:24s} {last['cpu_s'] / 3600:6.2f} CPU-h {last['step']:7d} steps   "
            f"last 15/25/50: {last['psnr15']:.2f} / {last['psnr25']:.2f} / {last['psnr50']:.2f}   "
            f"best 25: {best['psnr25']:.2f} at {best['cpu_s'] / 3600:.2f} CPU-h"
        )
    if args.plot and rows:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train (or resume) one run")
    r.add_argument("--dir", required=True, help="campaign folder (outside the repository)")
    r.add_argument("--name", required=True)
    r.add_argument("--set", action="append", default=[], help="RestorerConfig field, FIELD=VALUE")
    r.add_argument("--cpu-budget", type=float, default=None, help="stop after this many CPU seconds in all")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    r.add_argument("--patch-size", type=int, default=64)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--decay-at", type=float, default=4.0, help="CPU-hours at constant lr before halving starts")
    r.add_argument("--decay-every", type=float, default=2.0, help="CPU-hours between halvings")
    r.add_argument("--val-every", type=float, default=300.0, help="CPU seconds between validations")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--init", default=None, help="a new run starts from this model file's weights (e.g. a bundled one)")
    s = sub.add_parser("report", help="one line per run; --plot writes PSNR against CPU-hours")
    s.add_argument("--dir", required=True)
    s.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
