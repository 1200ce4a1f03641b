"""Distil several students from one trained teacher, each with its own recipe and the same time budget, and score
each on the held-out sets (the trainer's `eval`), to choose the student recipe of the embedded model.

    PYTHONPATH=src python3 bench/distill_variants.py --workdir W --out $OUT/distill.json \\
        --variant base: --variant lr5:student_lr=5e-4 --variant focus:student_lr=5e-4,student_focus=3

`W` holds the trainer's `teacher.safetensors`, `ae.safetensors` and `text_encoder/`. The latents are built once;
every variant starts from the teacher's weights (the student stage from scratch), trains for the full scale's
student budget (`--seconds` overrides it), compiled on CUDA, and its EMA student is scored on `--eval` held-out
samples per set and saved as `W/flow_<name>.safetensors`. The CFG teacher is scored once. JSON is rewritten
after every variant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fluxrt.config import SHAPES
from fluxrt.models.transformer import Flux2
from fluxrt.pipeline import Pipeline
from fluxrt.train import flow, shapes
from fluxrt.train.evaluate import heldout_sets, score_pipeline, teacher_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402


def parse_variant(text: str, scale: dict) -> tuple[str, dict]:
    """'name:key=value,...' -> (name, the scale with those `student_*` numbers replaced)."""
    name, _, sets = text.partition(":")
    bad = [k for k, _, _ in (i.partition("=") for i in filter(None, sets.split(","))) if not k.startswith("student_")]
    if bad:
        raise SystemExit(f"--variant {text!r}: {bad[0]!r} is not a student_* number of the scale")
    return name, shapes.set_numbers(scale, sets, "--variant")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--seconds", type=float, default=None, help="student budget (default: the full scale's)")
    ap.add_argument("--eval", type=int, default=100, help="held-out samples per set")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", default="full", choices=sorted(shapes.SCALES))
    ap.add_argument("--out", default="distill_variants.json")
    args = ap.parse_args(argv)
    scale = dict(shapes.SCALES[args.scale])
    if args.seconds is not None:
        scale["student"] = (scale["student"][0], args.seconds)
    variants = [parse_variant(v, scale) for v in args.variant]
    dev = torch.device(args.device)
    run = shapes.Run(Path(args.workdir), dev, scale, workers=16, compile=dev.type == "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    data = shapes.latent_set(run)
    teacher = shapes.load_flow(run, "teacher.safetensors", shapes.teacher_config())
    ae, te = shapes.load_ae(run), shapes.load_text_encoder(run)
    size, sets = scale["size"], heldout_sets(args.eval, scale["size"])
    score = lambda pipe: score_pipeline(pipe, sets, size, SHAPES.default_steps, SHAPES.default_guidance, run.log)  # noqa: E731
    res = {"env": environment(dev), "argv": sys.argv,
           "teacher": score(Pipeline(teacher_spec(), teacher, ae, te, torch.float32)),
           "variants": {}}  # fmt: skip
    write_json(args.out, res)
    for name, vscale in variants:
        recipe = shapes.distill_recipe(vscale)
        run.log(f"variant {name}: {recipe}")
        student = flow.student_from_teacher(teacher, Flux2(SHAPES.transformer).to(dev)).requires_grad_(True)
        losses: list[str] = []
        budget = run.budget("student")
        t0 = time.time()
        ema = flow.distill_student(student, teacher, data, budget, scale["batch"], recipe, seed=1,
                                   log=lambda m: (losses.append(m), run.log(m)), compile=run.compile)  # fmt: skip
        train_s = time.time() - t0
        weights = shapes.save_bf16(ema, run.workdir / f"flow_{name}.safetensors")
        ema.load_state_dict({k: v.float() for k, v in weights.items()})  # scored as shipped: bf16-rounded
        scores = score(Pipeline(SHAPES, ema.eval().requires_grad_(False), ae, te, torch.float32))
        res["variants"][name] = {"recipe": {**recipe.__dict__}, "steps": budget.total, "train_s": train_s,
                                 "last_log": losses[-1] if losses else None, "student": scores}  # fmt: skip
        write_json(args.out, res)
        torch._dynamo.reset()
    for name, r in res["variants"].items():
        gaps = {k: round(100 * (r["student"][k] - res["teacher"][k])) for k in r["student"]}
        print(f"{name:12s} steps {r['steps']:5d}  student {r['student']}  gap (points) {gaps}", flush=True)


if __name__ == "__main__":
    main()
