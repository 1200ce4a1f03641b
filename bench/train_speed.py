"""Steps per second of the embedded model's trainer (teacher and student), eager vs torch.compile.

    PYTHONPATH=src python3 bench/train_speed.py --workdir runs/g4 --out $OUT/train_speed.json

`--workdir` needs a trained `ae.safetensors`, `text_encoder/` and `teacher.safetensors` (the `vae`, `text` and
`teacher` stages' outputs). Each variant trains from the same weights for --warmup steps (not timed, they pay
for CUDA start-up and compilation), then --steps timed steps; the full-scale batch and image size are used, on a
subset of --examples scenes (rendering all 80k would take a minute and does not change a step's cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fluxrt.config import SHAPES
from fluxrt.models.transformer import Flux2
from fluxrt.train import flow, shapes
from fluxrt.train.schedule import Budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, sync, write_json  # noqa: E402


class Clock(Budget):
    """A fixed step count that notes the time when step `mark` ends (after warm-up and compilation)."""

    def __init__(self, steps: int, mark: int, device: torch.device):
        super().__init__(steps)
        self.mark, self.t_mark, self.device = mark, None, device

    def update(self, step: int) -> None:
        if step + 1 == self.mark:
            sync(self.device)
            self.t_mark = time.perf_counter()


def timed(fn, warmup: int, steps: int, device: torch.device) -> dict:
    """Per-step seconds of `fn(budget)` over its last `steps` steps; `warm_s`: everything before them."""
    clock = Clock(warmup + steps, warmup, device)
    t0 = time.perf_counter()
    fn(clock)
    sync(device)
    per = (time.perf_counter() - clock.t_mark) / steps
    return {"s_per_step": per, "steps_per_s": 1 / per, "warm_s": clock.t_mark - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--examples", type=int, default=8000)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--variants", nargs="+", default=["eager", "compile"])
    ap.add_argument("--batch", type=int, default=None, help="default: the full scale's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="train_speed.json")
    args = ap.parse_args(argv)
    scale = dict(shapes.SCALES["full"], examples=args.examples)
    scale["batch"] = args.batch or scale["batch"]
    run = shapes.Run(Path(args.workdir), torch.device(args.device), scale, workers=16)
    torch.backends.cuda.matmul.allow_tf32 = True
    data = shapes.latent_set(run)
    teacher = shapes.load_flow(run, "teacher.safetensors", shapes.teacher_config())
    res = {"env": environment(run.device), "batch": scale["batch"], "examples": args.examples, "results": {}}
    for v in args.variants:
        compile = v == "compile"

        def teach(budget, compile=compile):
            model = Flux2(shapes.teacher_config()).to(run.device)
            model.load_state_dict(teacher.state_dict())
            flow.train_teacher(model, data, budget, scale["batch"], lr=scale["lr"], log=lambda m: None,
                               compile=compile)  # fmt: skip

        def student(budget, compile=compile):
            s = flow.student_from_teacher(teacher, Flux2(SHAPES.transformer).to(run.device)).requires_grad_(True)
            flow.distill_student(s, teacher, data, budget, scale["batch"], shapes.distill_recipe(scale),
                                 log=lambda m: None, compile=compile)  # fmt: skip

        for stage, fn in (("teacher", teach), ("student", student)):
            r = timed(fn, args.warmup, args.steps, run.device)
            res["results"][f"{stage}:{v}"] = r
            print(f"{stage:8s} {v:8s} {r['s_per_step'] * 1e3:7.1f} ms/step  {r['steps_per_s']:6.2f} steps/s  "
                  f"(warm-up {r['warm_s']:.0f} s)", flush=True)  # fmt: skip
            write_json(args.out, res)


if __name__ == "__main__":
    main()
