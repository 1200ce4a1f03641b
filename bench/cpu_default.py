"""End-to-end time of one image from the embedded default model on the CPU (text encoding, denoising, decoding).

    python bench/cpu_default.py --size 256 --runs 5 --out cpu_default.json

Each run uses a new prompt, so the prompt cache never helps; the stages are timed separately and the median of
`--runs` runs is reported, after one warm-up run. Model loading is timed once, on its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from fluxrt.pipeline import Pipeline
from fluxrt.request import Sample

PROMPTS = [
    "a large red circle in the center on a white background",
    "a small blue square in the top left and a big yellow triangle at the bottom on a gray background",
    "black background; a large orange diamond on the right",
    "a tiny pink circle at the bottom right on a beige background",
    "a big cyan triangle in the top right and a small green square on the left, white background",
    "gray background with a large purple diamond in the middle",
    "a small yellow circle at the top on a black background",
]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_once(pipe: Pipeline, prompt: str, size: int, steps: int, guidance: float) -> dict:
    s = Sample(prompt, seed=0)
    _, t_text = timed(lambda: pipe.encode_prompts([prompt]))
    latents, t_denoise = timed(lambda: pipe.denoise([s], size, size, steps, guidance))
    _, t_decode = timed(lambda: pipe.decode(latents))
    return {"text_s": t_text, "denoise_s": t_denoise, "decode_s": t_decode, "total_s": t_text + t_denoise + t_decode}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pipe, t_load = timed(lambda: Pipeline.load(None, device="cpu"))
    steps = args.steps or pipe.spec.default_steps
    run_once(pipe, PROMPTS[-1], args.size, steps, pipe.spec.default_guidance)  # warm-up
    runs = [run_once(pipe, p, args.size, steps, pipe.spec.default_guidance) for p in PROMPTS[: args.runs]]
    res = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    res.update(
        model=pipe.spec.name, size=args.size, steps=steps, runs=len(runs), load_s=t_load,
        threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(), torch=torch.__version__,
        date=datetime.date.today().isoformat(),
    )  # fmt: skip
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
