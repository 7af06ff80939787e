"""Train the Fashion-MNIST classifier whose features the FID benchmark uses, in plain PyTorch (no Ray).

Cross-entropy with Adam (D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015), a cosine
learning-rate decay to zero (I. Loshchilov, F. Hutter, "SGDR", ICLR 2017, without restarts) and light augmentation:
random horizontal flips (every Fashion-MNIST class is a valid garment mirrored) and random shifts of up to
`max_shift` pixels with zero fill (the background is black). Every source of randomness is seeded.

    python -m restoration.train.classifier --out restoration/weights/fmnist-classifier.pt --seconds 240

trains on the train split, measures accuracy on the test split, and writes the model file plus a JSON record beside
it (`<stem>.json`, in the same layout as the other bundled models).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoration.checkpoint import save_model
from restoration.models.classifier import Classifier, ClassifierConfig


@dataclass(frozen=True)
class ClassifierFitConfig:
    """Options of `fit_classifier`.

    Training stops after `epochs` passes over the data or once `time_budget_s` seconds are spent, whichever comes
    first; the cosine schedule follows the progress max(step / total_steps, elapsed / time_budget_s), so a
    time-limited run still anneals to the end of its schedule.
    """

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    time_budget_s: float | None = None
    max_shift: int = 2  # random translation in pixels, each axis; 0 disables it
    flip: bool = True  # random horizontal flips
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClassifierFitConfig.{name}={value!r}: expected an int >= 1")
        if not self.lr > 0:
            raise ValueError(f"ClassifierFitConfig.lr={self.lr!r}: expected a number > 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"ClassifierFitConfig.weight_decay={self.weight_decay!r}: expected a number >= 0")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"ClassifierFitConfig.time_budget_s={self.time_budget_s!r}: expected seconds > 0 or None")
        if not isinstance(self.max_shift, int) or not 0 <= self.max_shift < 14:
            raise ValueError(f"ClassifierFitConfig.max_shift={self.max_shift!r}: expected an int in [0, 14)")


def augment(x: Tensor, max_shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and integer shifts with zero fill, drawn per image.

    Args:
        x: (B, C, H, W) images.
        max_shift: shifts are drawn uniformly from [-max_shift, max_shift] on each axis.
        flip: whether to mirror each image with probability 1/2.
        generator: CPU source of the random draws.
    Returns:
        (B, C, H, W) augmented images (a new tensor).
    """
    b, _, h, w = x.shape
    out = x
    if flip:
        mirrored = torch.rand(b, generator=generator) < 0.5  # (B,)
        out = torch.where(mirrored.to(x.device)[:, None, None, None], x.flip(-1), x)
    if max_shift > 0:
        s = max_shift
        padded = F.pad(out, (s, s, s, s))  # (B, C, H + 2s, W + 2s), zeros around
        # Crop a window whose top-left corner is (s + dy, s + dx) in the padded image: a shift by (-dy, -dx).
        offsets = torch.randint(0, 2 * s + 1, (b, 2), generator=generator).to(x.device)  # (B, 2): row, column
        rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return out.contiguous()


def _lr_factor(progress: float) -> float:
    """Cosine decay from 1 at progress 0 to 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _check_data(images: Tensor, labels: Tensor, num_classes: int) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28) or not images.is_floating_point():
        raise ValueError(
            f"images have shape {tuple(images.shape)} and dtype {images.dtype}: expected float (N, 1, 28, 28)"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)}: expected ({images.shape[0]},), one per image")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels span [{int(labels.min())}, {int(labels.max())}]: expected classes in [0, {num_classes})"
        )


def fit_classifier(
    images: Tensor, labels: Tensor, config: ClassifierFitConfig, log: Callable[[dict], None] | None = None
) -> dict:
    """Train a `Classifier` built from `config.model` with cross-entropy, Adam and a cosine schedule.

    Args:
        images: (N, 1, 28, 28) float32 in [0, 1], on CPU (the model is built and trained on CPU).
        labels: (N,) int64 class indices.
        config: the training options (and the model's architecture).
        log: called with {"epoch", "step", "loss", "train_accuracy", "lr", "seconds"} after every epoch.
    Returns:
        History {"model": the trained Classifier in eval mode, "steps": steps done, "epochs": epochs completed
        (the last may be partial), "loss": per-epoch mean losses, "train_accuracy": per-epoch accuracies on the
        augmented batches, "seconds": wall time, "stopped": "epochs" or "time_budget"}.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    _check_data(images, labels, config.model.num_classes)
    torch.manual_seed(config.seed)  # weight initialisation and dropout masks
    model = Classifier(config.model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)  # shuffling and augmentation
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    history = {"model": model, "steps": 0, "epochs": 0, "loss": [], "train_accuracy": [], "seconds": 0.0}
    history["stopped"] = "epochs"

    start = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for first in range(0, n, config.batch_size):
            elapsed = time.perf_counter() - start
            if config.time_budget_s is not None and elapsed >= config.time_budget_s:
                history["stopped"] = "time_budget"
                break
            progress = step / total_steps
            if config.time_budget_s is not None:
                progress = max(progress, elapsed / config.time_budget_s)
            lr = config.lr * _lr_factor(progress)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Sample and augment a batch.
            index = order[first : first + config.batch_size]
            x = augment(images[index], config.max_shift, config.flip, generator)  # (B, 1, 28, 28)
            y = labels[index]  # (B,)

            # Update weights.
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(index)

        if seen:
            history["epochs"] = epoch + 1
            history["loss"].append(loss_sum / seen)
            history["train_accuracy"].append(correct / seen)
            if log is not None:
                log(
                    {
                        "epoch": epoch + 1,
                        "step": step,
                        "loss": loss_sum / seen,
                        "train_accuracy": correct / seen,
                        "lr": lr,
                        "seconds": time.perf_counter() - start,
                    }
                )
        if history["stopped"] == "time_budget":
            break
    history["steps"] = step
    history["seconds"] = time.perf_counter() - start
    model.eval()
    return history


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy, in eval mode (the module's mode is restored afterwards).

    Args:
        model: maps (B, 1, 28, 28) images to (B, classes) logits.
        images: (N, 1, 28, 28) float images in [0, 1].
        labels: (N,) int class indices.
        batch_size: images per forward pass.
    Returns:
        The fraction of images whose highest logit is their label.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"{images.shape[0]} images and {labels.shape[0]} labels: expected the same count, >= 1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for first in range(0, images.shape[0], batch_size):
            x = images[first : first + batch_size].to(device)
            correct += int((model(x).argmax(1).cpu() == labels[first : first + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / images.shape[0]


def main(argv: list[str] | None = None) -> int:
    """Train on the Fashion-MNIST train split, score on the test split, write the model file and its JSON record."""
    from restoration.sources import read_fashion_mnist

    parser = argparse.ArgumentParser(prog="python -m restoration.train.classifier", description=__doc__)
    parser.add_argument(
        "--out", required=True, help="model file to write, e.g. restoration/weights/fmnist-classifier.pt"
    )
    parser.add_argument("--fashion-mnist", default=None, help="folder of the idx files (default: the Debian package's)")
    parser.add_argument("--epochs", type=int, default=ClassifierFitConfig.epochs)
    parser.add_argument("--seconds", type=float, default=None, help="wall-time budget of the training loop")
    parser.add_argument("--seed", type=int, default=ClassifierFitConfig.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = ClassifierFitConfig(epochs=args.epochs, time_budget_s=args.seconds, seed=args.seed)

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_fashion_mnist(name, args.fashion_mnist)  # (N, 28, 28) uint8, (N,) uint8
        return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None], torch.from_numpy(labels.astype(np.int64))

    (train_x, train_y), (test_x, test_y) = split("train"), split("test")

    def log(entry: dict) -> None:
        print(
            f"epoch {entry['epoch']}  step {entry['step']}  loss {entry['loss']:.4f}  "
            f"train acc {entry['train_accuracy']:.4f}  lr {entry['lr']:.2e}  {entry['seconds']:.0f}s",
            flush=True,
        )

    start = time.perf_counter()
    history = fit_classifier(train_x, train_y, config, log=log)
    model = history["model"]
    accuracy = evaluate_accuracy(model, test_x, test_y)
    wall = time.perf_counter() - start
    print(f"test accuracy {accuracy:.4f} ({len(test_y)} images); {history['steps']} steps in {history['seconds']:.0f}s")

    out = Path(args.out)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "model"}
    command = "python -m restoration.train.classifier " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {"training": settings, "test_accuracy": accuracy, "steps": history["steps"]}
    sha256 = save_model(out, "classifier", config.model, model, meta=meta)
    record = {
        "name": out.stem,
        "file": out.name,
        "sha256": sha256,
        "task": "Fashion-MNIST 10-class classifier; its penultimate layer is the feature space of restoration.fid",
        "model": {"kind": "classifier", **dataclasses.asdict(config.model)},
        "trained_on": f"Fashion-MNIST train split ({len(train_y):,} images)",
        "training": {
            "command": command,
            "hardware": f"{platform.machine()} CPU, {args.threads} torch thread(s), no GPU",
            "wall_seconds": round(history["seconds"]),
            "steps": history["steps"],
            "epochs_completed": history["epochs"],
            "stopped": history["stopped"],
            "settings": settings,
        },
        "metrics": {
            "test_accuracy": round(accuracy, 4),
            "test_images": len(test_y),
            "train_loss_per_epoch": [round(v, 4) for v in history["loss"]],
            "wall_seconds_with_evaluation": round(wall),
        },
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size:,} bytes, sha256 {sha256[:12]}) and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
