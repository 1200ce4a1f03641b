"""PSNR of quantized (fp8, nf4, int4) images against the unquantized model's: the embedded model, shapes prompts.

    python bench/fp8_quality.py --n 16 --size 256 --out bench/results/fp8_quality.json     # CPU: reference fp8
    PYTHONPATH=src python bench/fp8_quality.py --device cuda --out $OUT/fp8_quality.json     # GPU: scaled_mm, bf16

N captions of the shapes world (`fluxrt.world.sample_captioned`, seeds 0..N-1, the training distribution), one
image each (seed i, the model's default steps and guidance), made by the same pipeline three times: unquantized,
fp8 with the default layer choice (`quantize_transformer`, FP8_SKIP), fp8 on every block Linear (DEFAULT_SKIP),
and the 4-bit weight-only schemes nf4 and int4 (`fluxrt.quant.quantize`, their default skip).
On the CPU the fp8 layers use the reference product (both operands rounded to e4m3, fp32 matmul), the exact
emulation of the GPU kernel's rounding; on a GPU they run `torch._scaled_mm`. Reports PSNR (uint8 RGB, peak 255)
of each fp8 image against the unquantized one: mean, median, min. The issue's target: PSNR >= 30 dB.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import statistics
import time

import numpy as np
import torch
from common import write_json  # bench/ is on sys.path when run as a script

from fluxrt.pipeline import Pipeline
from fluxrt.quant import quantize
from fluxrt.quant.fp8 import DEFAULT_SKIP, FP8_SKIP, quantize_transformer
from fluxrt.request import Sample
from fluxrt.world import sample_captioned

VARIANTS = {
    "fp8": lambda m: quantize_transformer(m, FP8_SKIP),
    "fp8-all": lambda m: quantize_transformer(m, DEFAULT_SKIP),
    "nf4": lambda m: quantize(m, "nf4"),
    "int4": lambda m: quantize(m, "int4"),
}


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 RGB images (inf when equal)."""
    x, y = (np.asarray(im.convert("RGB"), dtype=np.float64) for im in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def summary(values: list[float]) -> dict:
    return {"mean_db": statistics.mean(values), "median_db": statistics.median(values), "min_db": min(values)}


def load_case(args):
    """The pipeline of --model on --device, and the first --n shapes captions as samples (seeds 0..N-1) with the
    model's default steps (or --steps) and guidance: (pipe, steps, guidance, prompts, samples)."""
    pipe = Pipeline.load(args.model, device=args.device)
    steps, guidance = args.steps or pipe.spec.default_steps, pipe.spec.default_guidance
    prompts = [sample_captioned(i)[1] for i in range(args.n)]
    return pipe, steps, guidance, prompts, [Sample(p, seed=i) for i, p in enumerate(prompts)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's (24)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="default: the embedded fluxrt-shapes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pipe, steps, guidance, prompts, samples = load_case(args)
    exact_model, images, seconds = pipe.transformer, {}, {}
    for name in ("exact", *VARIANTS):
        pipe.transformer = exact_model if name == "exact" else VARIANTS[name](copy.deepcopy(exact_model))
        t0 = time.perf_counter()
        images[name] = pipe.generate(samples, args.size, args.size, steps, guidance)
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {len(samples)} images in {seconds[name]:.1f} s", flush=True)
    res = {"model": pipe.spec.name, "size": args.size, "steps": steps, "guidance": guidance, "n": args.n,
           "device": args.device, "dtype": str(pipe.dtype), "seconds": seconds, "prompts": prompts}  # fmt: skip
    for name in VARIANTS:
        values = [psnr(a, b) for a, b in zip(images[name], images["exact"])]
        res[name] = {**summary(values), "per_image_db": values}
        print(f"{name} vs exact: PSNR mean {res[name]['mean_db']:.2f} dB, median {res[name]['median_db']:.2f}, "
              f"min {res[name]['min_db']:.2f}")  # fmt: skip
    res.update(torch=torch.__version__, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               date=datetime.date.today().isoformat())  # fmt: skip
    write_json(args.out, res)


if __name__ == "__main__":
    main()
