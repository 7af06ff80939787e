"""Bundle a trained generator: copy a DCGAN or VAE run's model file into restoration/weights/ with its JSON record.

    python scripts/bundle_generator.py RUN_FOLDER NAME --command "restoration train ..." [--model-file FILE] \
        [--wall-seconds S] [--fid N] [--prior-components K]

RUN_FOLDER is the run's storage folder (local), holding `config.json`, `checkpoint_manager_snapshot.json` and the
exported `model.pt`; `--model-file` bundles another file of the run instead (a checkpoint's `model.pt`). The record
holds what made the model (preset config, command, wall time, the checkpoint's epoch and metrics) and, with --fid,
the FID measured by `restoration bench fid` on N samples (features of the bundled Fashion-MNIST classifier); for a
class-conditional model also the share of its samples the classifier puts in the class asked for, the classifier's
accuracy on the real test images, and the FID per class.
`--class-guidance W` sets a conditional VAE's class guidance (`VAEConfig.class_guidance`).
`--prior-components K` gives a VAE trained without a sampling prior the one the `prior_components` training option
fits at every checkpoint (`fit_latent_prior`, on 20,000 images of the Fashion-MNIST train split, seed 0); a
class-conditional VAE gets K components per class, each class's mixture fitted to that class's images among them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from restoration.checkpoint import WEIGHTS_DIR, LoadedModel, load_model, save_model

TASKS = {
    "dcgan": "DCGAN on Fashion-MNIST 28x28; the generator in the file is the EMA generator",
    "vae": "convolutional VAE (Bernoulli likelihood) on Fashion-MNIST 28x28: sampling, reconstruction, interpolation",
    "cvae": "convolutional VAE (Bernoulli likelihood) on Fashion-MNIST 28x28: sampling, interpolation between classes",
}
CONDITIONAL = "class-conditional ({classes} classes, names in the file and under `labels`) "


def checkpoint_metrics(run: Path, model_file: Path) -> dict:
    """The metrics Ray Train recorded for the checkpoint `model_file` belongs to (the best one for the run's export)."""
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    results = snapshot["checkpoint_results"]
    if model_file.parent != run:  # a checkpoint folder's model.pt
        results = [r for r in results if r["checkpoint_dir_name"] == model_file.parent.name]
        if not results:
            raise SystemExit(f"{model_file.parent.name} is not among the run's recorded checkpoints")
        return results[0]["metrics"]
    config = json.loads((run / "config.json").read_text())
    pick = min if config.get("score_order", "min") == "min" else max
    return pick(results, key=lambda r: r["metrics"][config["score"]])["metrics"]


def with_fitted_prior(loaded: LoadedModel, components: int, images: int = 20_000, seed: int = 0):
    """The VAE of `loaded` rebuilt with a `components`-mixture sampling prior fitted to its aggregate posterior on
    `images` images of the Fashion-MNIST train split (per class, with their labels, for a conditional VAE).
    Returns (LoadedModel, the fit's summary)."""
    import dataclasses

    import numpy as np
    import torch

    from restoration.models.vae import VAE
    from restoration.sources import read_fashion_mnist
    from restoration.train.vae_core import fit_latent_prior

    config = dataclasses.replace(loaded.config, prior_components=components)
    vae = VAE(config)
    missing = vae.load_state_dict(loaded.module.state_dict(), strict=False).missing_keys
    assert all(key.startswith("prior_") for key in missing), missing
    train_x, train_y = read_fashion_mnist("train")
    train = torch.from_numpy(train_x.copy())[:, None]  # (N, 1, 28, 28) uint8
    subset = torch.from_numpy(np.random.default_rng([seed, 0]).permutation(len(train))[:images])
    labels = torch.from_numpy(train_y.astype(np.int64))[subset] if config.labels else None
    summary = fit_latent_prior(vae, train[subset], seed=seed, labels=labels)
    return dataclasses.replace(loaded, config=config, module=vae.eval()), summary


def with_class_guidance(loaded: LoadedModel, guidance: float) -> LoadedModel:
    """The conditional VAE of `loaded` with `VAEConfig.class_guidance` set (the weights unchanged)."""
    import dataclasses

    from restoration.models.vae import VAE

    config = dataclasses.replace(loaded.config, class_guidance=guidance)
    vae = VAE(config)
    vae.load_state_dict(loaded.module.state_dict())
    return dataclasses.replace(loaded, config=config, module=vae.eval())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run's local storage folder")
    parser.add_argument("name", help="bundled name, e.g. dcgan-fmnist")
    parser.add_argument("--command", required=True, help="the training command that made it")
    parser.add_argument("--model-file", type=Path, default=None, help="default: RUN/model.pt (the run's export)")
    parser.add_argument("--wall-seconds", type=float, default=None, help="training wall time")
    parser.add_argument("--fid", type=int, default=0, help="also measure FID on this many samples")
    parser.add_argument(
        "--prior-components", type=int, default=0, help="VAE: fit a mixture sampling prior of K (per class)"
    )
    parser.add_argument(
        "--class-guidance", type=float, default=0.0, help="conditional VAE: the decoder's class guidance (VAEConfig)"
    )
    args = parser.parse_args(argv)

    model_file = args.model_file or args.run / "model.pt"
    loaded = load_model(model_file)
    if loaded.kind not in TASKS:
        raise SystemExit(f"{model_file} holds a {loaded.kind} model, expected dcgan or vae")
    metrics = checkpoint_metrics(args.run, model_file)
    labels = list(getattr(loaded.config, "labels", ()))
    target = WEIGHTS_DIR / f"{args.name}.pt"
    prior = None
    if args.prior_components:
        if loaded.kind != "vae" or loaded.config.prior_components:
            raise SystemExit(f"--prior-components needs a VAE without a sampling prior; {model_file} is not one")
        loaded, prior = with_fitted_prior(loaded, args.prior_components)
    if args.class_guidance:
        if loaded.kind != "vae" or not labels:
            raise SystemExit(f"--class-guidance needs a conditional VAE; {model_file} is not one")
        loaded = with_class_guidance(loaded, args.class_guidance)
    if prior is not None or args.class_guidance:
        save_model(
            target, "vae", loaded.config, loaded.module, meta={**loaded.meta, **({"prior": prior} if prior else {})}
        )
        loaded = load_model(target)
    else:
        shutil.copyfile(model_file, target)
    record = {
        "name": args.name,
        "file": target.name,
        "sha256": loaded.sha256,
        "task": (CONDITIONAL.format(classes=len(labels)) if labels else "")
        + TASKS["cvae" if labels and loaded.kind == "vae" else loaded.kind],
        "model": {"kind": loaded.kind, **vars(loaded.config)},
        "trained_on": "Fashion-MNIST train split (60,000 images), 1 in 20 held out for the score",
        "training": {
            "command": args.command,
            "hardware": "2 CPU cores, 1 Ray Train worker, no GPU",
            "wall_seconds": args.wall_seconds,
            "epoch": metrics.get("epoch"),
            "config": json.loads((args.run / "config.json").read_text()),
        },
        "metrics": {k: v for k, v in metrics.items() if k not in ("epoch", "started_from_epoch")},
    }
    if prior is not None:
        record["training"]["prior"] = {
            "fitted": "after training, by scripts/bundle_generator.py --prior-components (fit_latent_prior)",
            **prior,
        }
    if args.fid:
        import tempfile

        from restoration.bench.fid import run_fid_bench

        with tempfile.TemporaryDirectory() as out_dir:
            result = run_fid_bench([str(target)], n=args.fid, seed=0, out_dir=Path(out_dir))
        row = next(r for r in result["rows"] if r["name"] == args.name)
        record["metrics"][f"fid_classifier_{args.fid}"] = round(row["fid"], 2)
        if "per_class" in row:  # a conditional model, asked for the test images' classes
            record["metrics"][f"label_accuracy_{args.fid}"] = round(row["label_accuracy"], 4)
            record["metrics"]["classifier_real_accuracy"] = round(row["real_accuracy"], 4)
            record["metrics"][f"fid_per_class_{args.fid}"] = {c["label"]: round(c["fid"], 2) for c in row["per_class"]}
    (WEIGHTS_DIR / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"bundled {target} ({target.stat().st_size / 1e6:.1f} MB), sha256 {loaded.sha256[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
