"""The step cache's speed and error: images with `--cache T` against the exact images, the embedded model.

    python bench/step_cache.py --n 16 --size 256 --thresholds 0.05 0.1 0.2 0.3 --out step_cache.json   # CPU
    PYTHONPATH=src python bench/step_cache.py --device cuda --model PATH --size 1024 --out $OUT/step_cache.json

N captions of the shapes world (seeds 0..N-1, the model's default steps and guidance), one image each, made by
one pipeline: exact (no cache), then with `fluxrt.accel.cache` at each threshold (applied to the same
transformer, removed after). Per threshold: the fraction of forwards that skipped the later blocks, the wall
time of all N images against the exact runs' (one image at a time, after one warm-up image; the exact images are
made twice and their mean time is the reference, the two times show the noise), and the PSNR (uint8
RGB) of each image against its exact one: mean, median, min (inf where an image came out identical; those are
counted too).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
from common import write_json  # bench/ is on sys.path when run as a script
from fp8_quality import load_case, psnr, summary

from fluxrt.accel.cache import apply_step_cache, remove_step_cache


def timed_images(pipe, samples, size: int, steps: int, guidance: float):
    """Images one at a time (the cache decides per batch), the seconds they took, and the fraction of their
    forwards that skipped the later blocks (None without a step cache; each `generate` restarts the counts)."""
    pipe.generate(samples[:1], size, size, steps, guidance)  # warm-up
    images, skipped, forwards = [], 0, 0
    t0 = time.perf_counter()
    for s in samples:
        images.append(pipe.generate([s], size, size, steps, guidance)[0])
        if pipe.step_cache is not None:
            skipped, forwards = skipped + pipe.step_cache.skipped, forwards + pipe.step_cache.steps
    return images, time.perf_counter() - t0, skipped / forwards if forwards else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's (24)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="default: the embedded fluxrt-shapes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pipe, steps, guidance, prompts, samples = load_case(args)
    exact, first_s, _ = timed_images(pipe, samples, args.size, steps, guidance)
    again, again_s, _ = timed_images(pipe, samples, args.size, steps, guidance)  # the exact time, twice: its spread
    assert all(psnr(a, b) == float("inf") for a, b in zip(exact, again)), "the exact path is not deterministic"
    exact_s = (first_s + again_s) / 2
    print(f"exact: {args.n} images in {first_s:.1f} s, then {again_s:.1f} s", flush=True)
    res = {"model": pipe.spec.name, "size": args.size, "steps": steps, "guidance": guidance, "n": args.n,
           "device": args.device, "dtype": str(pipe.dtype), "exact_s": exact_s, "exact_runs_s": [first_s, again_s],
           "thresholds": {}}  # fmt: skip
    for threshold in args.thresholds:
        apply_step_cache(pipe.transformer, threshold)
        images, seconds, skipped = timed_images(pipe, samples, args.size, steps, guidance)
        remove_step_cache(pipe.transformer)
        values = [psnr(a, b) for a, b in zip(images, exact)]
        row = {**summary(values), "identical_images": sum(v == float("inf") for v in values),
               "skipped_fraction": skipped, "seconds": seconds, "speedup": exact_s / seconds,
               "per_image_db": values}  # fmt: skip
        res["thresholds"][str(threshold)] = row
        print(f"threshold {threshold}: {100 * skipped:.0f}% of steps skipped, {seconds:.1f} s ({row['speedup']:.2f}x), "
              f"PSNR mean {row['mean_db']:.2f} dB, median {row['median_db']:.2f}, min {row['min_db']:.2f}, "
              f"{row['identical_images']} identical", flush=True)  # fmt: skip
    res.update(torch=torch.__version__, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               date=datetime.date.today().isoformat(), prompts=prompts)  # fmt: skip
    write_json(args.out, res)


if __name__ == "__main__":
    main()
