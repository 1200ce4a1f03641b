"""`fluxrt generate`'s parallel path (rank 0 encodes the prompt, the ranks split the transformer) against one process.

    PYTHONPATH=src python3 bench/parallel_generate.py --gpus 2 --plans sp ring tp --size 512 --out $OUT/pg.json

One request (default: the embedded model, one prompt, seed 0, its default steps) is run by one process
(`Pipeline.run`, what `fluxrt generate` does) and then by `--gpus N` spawned ranks for each plan
(`fluxrt.parallel.generate.Launch`, the code behind `fluxrt generate --gpus N --parallel PLAN`), without the safety
guard and the file writing, which run in the main process either way. Reports each image's difference from the
single-process image (max |diff| in uint8 levels, PSNR) and the wall seconds (for the ranks: start, load and
generate, so a small model's numbers are dominated by process start-up).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time

import numpy as np
import torch
from common import write_json  # bench/ is on sys.path when run as a script

from fluxrt.cli import _load, build_parser, request_from_args
from fluxrt.parallel import nccl_env
from fluxrt.parallel.generate import Launch
from fluxrt.parallel.launch import rank_device_type
from fluxrt.parallel.plan import choose_plan
from fluxrt.pipeline import resolve_model
from fluxrt.request import validate


def compare(a, b) -> dict:
    x, y = (np.asarray(im.convert("RGB"), dtype=np.float64) for im in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return {"max_abs": float(np.abs(x - y).max()), "psnr_db": math.inf if mse == 0 else 10 * math.log10(255**2 / mse)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--plans", nargs="+", default=["sp", "ring", "tp"])
    ap.add_argument("--prompt", default="a large red circle in the center on a white background")
    ap.add_argument("--model", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu: CPU ranks over gloo (default: cuda if available)")
    ap.add_argument("--flags", default="", help="more `fluxrt generate` options for the parallel runs, checked as "
                    "the command line checks them, e.g. '--overlap --transport copy-engine --compile --cuda-graph'")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    argv = ["generate", a.prompt, "--seed", "0", "--size", str(a.size), "--quiet"]
    argv += ["--steps", str(a.steps)] if a.steps else []
    argv += ["--model", a.model] if a.model else []
    argv += ["--device", a.device] if a.device else []
    args = build_parser().parse_args(argv)
    ref = resolve_model(args.model)
    valid = validate(request_from_args(args, {}), ref.spec)
    t0 = time.perf_counter()
    single = _load(ref, args, {}).run(valid)[0].image
    rows = [{"plan": "1 process", "wall_s": time.perf_counter() - t0}]
    kind = rank_device_type(torch.device(a.device).type if a.device else None)
    for name in a.plans:
        if a.flags:  # through the command line's own checks (`Launch.from_args`)
            pargs = build_parser().parse_args(argv + ["--gpus", str(a.gpus), "--parallel", name, *shlex.split(a.flags)])
            launch, pvalid = Launch.from_args(pargs, ref.spec, {}), validate(request_from_args(pargs, {}), ref.spec)
        else:
            pargs, pvalid = args, valid
            launch = Launch(choose_plan(ref.spec.transformer, a.gpus, name), spawn=True, device_type=kind)
        t0 = time.perf_counter()
        image = launch.run(ref, pargs, pvalid, {})[0].image
        rows.append({"plan": launch.plan.name, "flags": a.flags, "wall_s": time.perf_counter() - t0,
                     **compare(image, single)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    res = {"model": ref.spec.name, "size": a.size, "steps": valid.steps, "gpus": a.gpus, "device_type": kind,
           "card": torch.cuda.get_device_name() if kind == "cuda" else "cpu", "torch": torch.__version__,
           "nccl_env": nccl_env(), "rows": rows}  # fmt: skip
    print(json.dumps(res, indent=1))
    write_json(a.out, res)


if __name__ == "__main__":
    main()
