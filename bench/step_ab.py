"""Compare compiled variants of one full-size transformer step in alternating rounds on one build (issue 5).

    PYTHONPATH=src python bench/step_ab.py --variants unfused,fused --rounds 4 --out $OUT/ab.json
    PYTHONPATH=src python bench/step_ab.py --dry-run          # the tiny preset on the CPU, all the logic

A small effect (1-3%) is below the drift of a card that heats up over minutes, so timing variant A after variant
B favours whichever ran first. Here the model is built once, compiled once (`compile_transformer`), and each
variant is a setting of that compiled model (its graphs are compiled in the warm-up, then cached side by side);
rounds then run every variant in turn, each for --steps CUDA-event-timed steps, and the order rotates every
round. Reported: each round's median s/step per variant, the mean over rounds, each variant's ratio to the first,
and the output's difference to the first variant's.

Variants: unfused (the model's QK-norm + RoPE ops, compiled by inductor), fused (fluxrt.accel.norm_rope's Triton
kernel, (B, L, H, D) output: what compile_transformer picks on CUDA), fused-bhld (the same kernel writing
(B, H, L, D)).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_case_args,
    bench_device,
    compare,
    dynamo_limits,
    environment,
    first_call_s,
    inputs,
    random_flux2,
    run_main,
    time_steps,
    write_json,
)

from fluxrt.accel.compile import compile_transformer, use_fused_kernels
from fluxrt.config import get_preset
from fluxrt.quant.fp8 import quantize_transformer

VARIANTS = {"unfused": None, "fused": "triton-blhd", "fused-bhld": "triton"}  # name: QKNorm kernel


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap)
    ap.add_argument("--variants", default="unfused,fused", type=lambda s: s.split(","))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--fp8", action="store_true", help="quantize (default fp8 layers) before compiling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny preset, 64², 16 text tokens, fp32, CPU")
    args = ap.parse_args(argv)
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad:
        ap.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    if args.dry_run:
        args.model, args.size, args.n_txt, args.rounds, args.steps = "tiny", 64, 16, 2, 2
    return args


def _run(args):
    device, dtype = bench_device(args)
    dynamo_limits()
    cfg = get_preset(args.model).transformer
    model = random_flux2(cfg, device, dtype, args.seed)
    if args.fp8:
        quantize_transformer(model)
    inp = inputs(cfg, args.size, args.refs, device, dtype, args.n_txt)
    compile_transformer(model, fused=False)
    result = {"env": environment(device), "command": " ".join(sys.argv), "args": vars(args), "warmup": {},
              "rounds": [], "summary": {}}  # fmt: skip
    outs = {}

    def setting(name):
        use_fused_kernels(model, VARIANTS[name])

    with torch.inference_mode():
        for name in args.variants:  # compiles each variant's graphs, then they stay cached side by side
            setting(name)
            result["warmup"][name], outs[name] = first_call_s(lambda: model(*inp).float().cpu(), device)
            print(f"{name}: first call {result['warmup'][name]:.1f} s", flush=True)
        order = list(args.variants)
        for r in range(args.rounds):
            row = {}
            for name in order:
                setting(name)
                row[name] = statistics.median(time_steps(lambda: model(*inp), device, 1, args.steps))
            result["rounds"].append({"order": list(order), "s_per_step": row})
            print(f"round {r}: " + ", ".join(f"{n} {row[n]:.4f}" for n in args.variants), flush=True)
            order = order[1:] + order[:1]
            write_json(args.out, result)
    first = args.variants[0]
    for name in args.variants:
        vals = [rd["s_per_step"][name] for rd in result["rounds"]]
        base = [rd["s_per_step"][first] for rd in result["rounds"]]
        d = compare(outs[name], outs[first])
        result["summary"][name] = {"mean_s_per_step": statistics.mean(vals), "min": min(vals), "max": max(vals),
                                   "ratio_to_first": statistics.mean(v / b for v, b in zip(vals, base)),
                                   "rel_l2_vs_first": d["rel_l2"], "max_abs_vs_first": d["max_abs"]}  # fmt: skip
        s = result["summary"][name]
        print(f"{name:>12}: mean {s['mean_s_per_step']:.4f} s/step ({s['min']:.4f}-{s['max']:.4f}), "
              f"x{s['ratio_to_first']:.4f} of {first}, rel L2 vs {first} {s['rel_l2_vs_first']:.2e}", flush=True)  # fmt: skip
    write_json(args.out, result)
    return result


def main(argv=None):
    return run_main(_run, parse_args(argv))


if __name__ == "__main__":
    main()
