"""Train the embedded model's VAE several times, each with its own recipe (learning rate, gradient clipping, seed),
for the same number of steps on the same renders, and score each on held-out renders, to see how stable the VAE
stage of `fluxrt.train.shapes` is and which recipe it should use.

    PYTHONPATH=src python3 bench/vae_variants.py --steps 800 --out $OUT/vae.json \\
        --variant base: --variant base_again: --variant clip:clip=1.0 --variant lr5:lr=5e-4

A variant is 'name:key=value,...' over lr, clip and seed (defaults: the trainer's lr 1e-3, no clipping, seed 0).
The scenes are the trainer's (`shapes.Run`, seed 0): the scale's first `vae_images` renders (training) and the next `--held` ones (scoring: MSE
of the posterior mean's reconstruction, the number the flow model inherits). JSON is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fluxrt.config import SHAPES
from fluxrt.models.autoencoder import AutoEncoder
from fluxrt.train import shapes, vae
from fluxrt.train.schedule import Budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

DEFAULTS = {"lr": 1e-3, "clip": 0.0, "seed": 0}  # the trainer's learning rate, no clipping


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:lr=5e-4,clip=1' -> (name, {'lr': 5e-4, 'clip': 1.0, 'seed': 0})."""
    name, _, sets = text.partition(":")
    return name or "base", shapes.set_numbers(DEFAULTS, sets, f"--variant {text!r}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--held", type=int, default=1024)
    ap.add_argument("--scale", default="full", choices=sorted(shapes.SCALES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default="vae_variants.json")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    scale, device = shapes.SCALES[args.scale], torch.device(args.device)
    n_train = scale["vae_images"]
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's scenes (its Run logs into its workdir)
        run = shapes.Run(Path(tmp), device, scale, workers=args.workers or os.cpu_count() or 1)
        images = run.images(n_train + args.held).to(device)
    res = {"environment": environment(device), "steps": args.steps, "batch": min(64, scale["batch"]),
           "crop": scale["vae_crop"], "n_train": n_train, "n_held": args.held, "variants": []}  # fmt: skip
    for name, v in variants:
        torch.manual_seed(v["seed"])
        ae = AutoEncoder(SHAPES.autoencoder).to(device)
        losses = []

        def log(msg: str, losses=losses, name=name) -> None:
            losses.append(msg)
            print(f"  {name}: {msg}", flush=True)

        t0 = time.time()
        last = vae.train_vae(ae, images[:n_train], Budget(args.steps), res["batch"], lr=v["lr"], seed=v["seed"],
                             crop=scale["vae_crop"], clip=v["clip"], log=log)  # fmt: skip
        secs = time.time() - t0
        mse = vae.reconstruction_mse(ae, images[n_train:])
        res["variants"].append({"name": name, **v, "seconds": round(secs, 1), "last_loss": last,
                                "held_out_mse": mse, "log": losses})  # fmt: skip
        print(f"{name}: {v} last loss {last:.5f}, held-out MSE {mse:.5f}, {secs:.0f}s", flush=True)
        write_json(args.out, res)


if __name__ == "__main__":
    main()
