"""Time one denoising step of full-size FLUX.2 transformers: fluxrt (eager, compiled, CUDA graph, fp8) vs diffusers.

    PYTHONPATH=src python bench/transformer_step.py --out $OUT/step.json --time-budget-s 560
    PYTHONPATH=src python bench/transformer_step.py --dry-run          # the whole logic on the CPU, tiny sizes

For each case (model, output size, number of same-size references; batch 1, 512 text tokens) and in one process
on one card: our model is built directly on the GPU from seeded random weights and timed eager, compiled
(`fluxrt.accel.compile_transformer`), compiled inside one CUDA graph, fp8 (`fluxrt.quant.quantize_transformer`,
its default layer choice) and fp8 compiled, and on request fp8-all (every block Linear) and fp8-all-compiled; it
is then freed and diffusers' `Flux2Transformer2DModel` is built from the same weights (regenerated per tensor name
and converted by our key map, so both never share the card) and timed eager and compiled
(`compile_repeated_blocks`, the same regional compile). Every output is kept on the CPU and compared
with diffusers' eager output (max abs, relative L2) and with our own eager output.

Rows: s/step (median of CUDA-event-timed steps after warm-up; the first call's wall time, which includes the
compile of a compiled variant, is first_call_s), the
ratio to diffusers-compiled (< 1: faster), TFLOP/s over the FLOP count of `step_flops` and its fraction of a
bf16 matmul ceiling measured in the same run (fp8 rows also against the fp8 ceiling), peak memory, and
s/image = s/step x the model's default steps (dev 50, klein 4). JSON is rewritten after every row, so a run
stopped by its time limit keeps what it measured. Cases run in priority order (no references first, 1024² before
512² before 2048²); with --time-budget-s each model gets an equal share of what is left and skips every case
whose expected time (its last case's, scaled by token count) would overrun its share.
diffusers is optional: without it, its rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bench_device,
    run_main,
    Budget,
    compare,
    diffusers_available,
    dynamo_limits,
    environment,
    first_call_s,
    free,
    inputs,
    matmul_ceilings,
    peak_gib,
    random_diffusers,
    random_flux2,
    release,
    reset_peak,
    step_flops,
    time_steps,
    write_json,
)

import fluxrt.accel  # noqa: F401 - registers the named attention kernels
from fluxrt.accel.compile import CUDAGraphStep, compile_transformer, decompile
from fluxrt.models.attention import attention_backend
from fluxrt.config import get_preset
from fluxrt.quant.fp8 import DEFAULT_SKIP, quantize_transformer

IMPLS = ("eager", "compiled", "cudagraph", "fp8", "fp8-compiled", "diffusers", "diffusers-compiled")
EXTRA = ("fp8-all", "fp8-all-compiled",  # on request (--impls): fp8 on every block Linear, the fastest, ~4% error
         "compiled-cudnn", "fp8-compiled-cudnn",  # compiled with cuDNN's fused attention (fluxrt.accel.attention)
         "compiled-unfused", "fp8-compiled-unfused")  # compiled without the fused QK-norm + RoPE kernel (fused=False)
OURS = (*IMPLS[:5], *EXTRA)
MODELS = ("flux.2-klein-4b", "flux.2-klein-9b", "flux.2-dev")


def case_order(size: int, refs: int) -> tuple:
    """Priority: fewer references first, then 1024² before 512² before 2048²."""
    return refs, abs(math.log2(size / 1024)), size


def parse_cases(args) -> list[tuple[str, int, int]]:
    if args.cases:
        out = []
        for item in args.cases.split(","):
            model, size, refs = item.split(":")
            out.append((model, int(size), int(refs)))
        return out
    pairs = sorted(itertools.product(args.sizes, args.refs), key=lambda p: case_order(*p))
    return [(m, s, r) for m in args.models for s, r in pairs]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","))
    ap.add_argument("--sizes", default="512,1024,2048", type=_ints)
    ap.add_argument("--refs", default="0,1,4", type=_ints)
    ap.add_argument("--cases", default=None, help="explicit MODEL:SIZE:REFS,... (overrides the three above)")
    ap.add_argument("--impls", default=",".join(IMPLS), type=lambda s: s.split(","))
    ap.add_argument("--n-txt", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default: about 3 s worth, 3 to 10)")
    ap.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"))
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--compile-backend", default=None, help="default inductor (aot_eager for --dry-run)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="start no case expected to end after it")
    ap.add_argument("--case-estimate-s", type=float, default=120.0, help="expected seconds of a first case")
    ap.add_argument("--ceiling-n", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU in fp32 with tiny sizes")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.cases = args.cases or "tiny:64:0,tiny:128:1"
        args.n_txt, args.warmup, args.iters, args.ceiling_n = 8, 1, 2, 256
    if args.compile_backend is None:  # inductor compiles C++ on a CPU: minutes, not seconds
        args.compile_backend = "aot_eager" if args.dry_run else "inductor"
    unknown = sorted(set(args.impls) - set(IMPLS) - set(EXTRA))
    if unknown:
        ap.error(f"unknown impls {unknown}; known: {', '.join(IMPLS + EXTRA)}")
    return args


# --------------------------------------------------------------------------------------------- measuring
def run_impl(name, fn, device, args, record, **extra) -> torch.Tensor | None:
    """First call (its wall time is compile + one step for a compiled model), warm-up, timed steps.

    Any failure (out of memory, a compile error) becomes the row's `error` and the run goes on.
    """
    y = None
    try:
        reset_peak(device)
        seconds, y = first_call_s(fn, device)
        times = time_steps(fn, device, args.warmup, args.iters)
        record(name, {"first_call_s": seconds, "s_per_step": statistics.median(times), "min_s": min(times),
                      "iters": len(times), "peak_mem_gib": peak_gib(device), **extra})  # fmt: skip
        return y.float().cpu()
    except Exception as e:  # noqa: BLE001 - a benchmark row records what went wrong and the run continues
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        print(f"  {name}: FAILED {msg}", flush=True)
        record(name, {"error": msg, **extra})
        y = None  # the first call's output, freed before release empties the cache
        release(device)
        return None


def compile_kwargs(args, fullgraph: bool = True) -> dict:
    kw = {"fullgraph": fullgraph, "dynamic": False, "backend": args.compile_backend}
    if args.compile_mode not in (None, "default"):
        kw["mode"] = args.compile_mode
    return kw


def run_with_attention(name, backend, compile_, step, model, device, args, record):
    """Compile under another attention kernel, time it, and undo both (CUDA only: the kernels are CUDA's)."""
    if device.type != "cuda":
        record(name, {"error": f"skipped: the {backend} attention kernel needs a CUDA device"})
        return None
    with attention_backend(backend):
        compile_()
        out = run_impl(name, step, device, args, record, attention=backend)
        decompile(model)
    free(device)
    return out


def run_unfused(name, compile_, step, model, device, args, record):
    """Compile with the model's own QK-norm + RoPE ops (`compile_transformer(fused=False)`), time it, undo it."""
    compile_(fused=False)
    out = run_impl(name, step, device, args, record, fused=False)
    decompile(model)
    free(device)
    return out


def run_ours(cfg, inp, device, dtype, args, record) -> dict[str, torch.Tensor]:
    """eager -> compiled -> cudagraph -> (decompile, quantize) fp8 -> fp8-compiled -> (decompile, quantize the
    remaining block Linears) fp8-all -> fp8-all-compiled, on one build. fp8 is the default layer choice
    (`FP8_SKIP`), fp8-all every block Linear (`DEFAULT_SKIP`)."""
    outs, impls = {}, args.impls
    model = random_flux2(cfg, device, dtype, args.seed)
    step = functools.partial(model, *inp)
    compile_ = functools.partial(
        compile_transformer, model, args.compile_mode, scope=args.compile_scope, backend=args.compile_backend
    )

    with torch.inference_mode():
        if "eager" in impls:
            outs["eager"] = run_impl("eager", step, device, args, record)
        if "compiled" in impls or "cudagraph" in impls:
            compile_()
            if "compiled" in impls:
                outs["compiled"] = run_impl("compiled", step, device, args, record)
            if "cudagraph" in impls and device.type != "cuda":
                record("cudagraph", {"error": "skipped: CUDA graphs need a CUDA device"})
            elif "cudagraph" in impls:  # the compiled model, its whole step captured as one CUDA graph
                graphed = CUDAGraphStep(model)
                outs["cudagraph"] = run_impl("cudagraph", functools.partial(graphed, *inp), device, args, record)
                del graphed
            decompile(model)
            free(device)
        if "compiled-cudnn" in impls:
            outs["compiled-cudnn"] = run_with_attention("compiled-cudnn", "cudnn", compile_, step, model, device, args,
                                                        record)
        if "compiled-unfused" in impls:
            outs["compiled-unfused"] = run_unfused("compiled-unfused", compile_, step, model, device, args, record)
        if any(i in impls for i in ("fp8", "fp8-compiled", "fp8-compiled-cudnn", "fp8-compiled-unfused")):
            quantize_transformer(model)
            if "fp8" in impls:
                outs["fp8"] = run_impl("fp8", step, device, args, record)
            if "fp8-compiled" in impls:
                compile_()
                outs["fp8-compiled"] = run_impl("fp8-compiled", step, device, args, record)
                decompile(model)
                free(device)
            if "fp8-compiled-cudnn" in impls:
                outs["fp8-compiled-cudnn"] = run_with_attention("fp8-compiled-cudnn", "cudnn", compile_, step, model,
                                                                device, args, record)
            if "fp8-compiled-unfused" in impls:
                outs["fp8-compiled-unfused"] = run_unfused("fp8-compiled-unfused", compile_, step, model, device, args,
                                                           record)  # fmt: skip
        if "fp8-all" in impls or "fp8-all-compiled" in impls:
            quantize_transformer(model, skip=DEFAULT_SKIP)  # adds the layers FP8_SKIP keeps
            if "fp8-all" in impls:
                outs["fp8-all"] = run_impl("fp8-all", step, device, args, record)
            if "fp8-all-compiled" in impls:
                compile_()
                outs["fp8-all-compiled"] = run_impl("fp8-all-compiled", step, device, args, record)
    del model, step, compile_
    free(device)
    return outs


def _first(model, kwargs):
    return model(**kwargs)[0]


def compile_diffusers(model, args, fullgraph: bool) -> None:
    """diffusers' own regional compile (`compile_repeated_blocks`), or the whole model for scope 'model'."""
    fn = model.compile_repeated_blocks if args.compile_scope == "blocks" else model.compile
    fn(**compile_kwargs(args, fullgraph))


def run_diffusers(cfg, inp, device, dtype, args, record) -> dict[str, torch.Tensor]:
    outs = {}
    model = random_diffusers(cfg, device, dtype, args.seed)
    x, x_ids, t, ctx, ctx_ids, g = inp
    kwargs = {"hidden_states": x, "encoder_hidden_states": ctx, "timestep": t, "img_ids": x_ids, "txt_ids": ctx_ids,
              "guidance": g, "return_dict": False}  # fmt: skip
    step = functools.partial(_first, model, kwargs)
    with torch.inference_mode():
        if "diffusers" in args.impls:
            outs["diffusers"] = run_impl("diffusers", step, device, args, record)
        if "diffusers-compiled" in args.impls:
            compile_diffusers(model, args, fullgraph=True)
            out = run_impl("diffusers-compiled", step, device, args, record, fullgraph=True)
            if out is None:  # e.g. a graph break under fullgraph=True: retry as torch.compile does by default
                decompile(model)
                free(device)
                compile_diffusers(model, args, fullgraph=False)
                out = run_impl("diffusers-compiled", step, device, args, record, fullgraph=False)
            outs["diffusers-compiled"] = out
    del model, step
    free(device)
    return outs


# ------------------------------------------------------------------------------------------------- a case
def run_case(model_name, size, refs, device, dtype, args, ceilings, rows, save) -> None:
    spec = get_preset(model_name)
    cfg = spec.transformer
    inp = inputs(cfg, size, refs, device, dtype, args.n_txt)
    n_img = inp[0].shape[1]
    flops = step_flops(cfg, args.n_txt, n_img)
    base = {"model": model_name, "size": size, "refs": refs, "n_img_tokens": n_img, "n_txt": args.n_txt,
            "step_tflop": flops / 1e12, "steps": spec.default_steps}  # fmt: skip
    case_rows: dict[str, dict] = {}

    def record(impl, res):
        row = {**base, "impl": impl, **res}
        if "s_per_step" in res:
            s = res["s_per_step"]
            row.update(tflops=flops / s / 1e12, s_per_image=s * spec.default_steps)
            if "bf16_tflops" in ceilings:
                row["frac_bf16_ceiling"] = row["tflops"] / ceilings["bf16_tflops"]
            if impl.startswith("fp8") and "fp8_tflops" in ceilings:
                row["frac_fp8_ceiling"] = row["tflops"] / ceilings["fp8_tflops"]
        case_rows[impl] = row
        rows.append(row)
        save()
        if "s_per_step" in row:
            print(f"  {impl:>18}: {row['s_per_step']:.4f} s/step, first call {row['first_call_s']:.1f} s", flush=True)

    print(f"{model_name} {size}² refs={refs}: {n_img} image + {args.n_txt} text tokens", flush=True)
    outs = {}
    if any(i in OURS for i in args.impls):
        outs.update(run_ours(cfg, inp, device, dtype, args, record))
    if any(i.startswith("diffusers") for i in args.impls):
        if diffusers_available():
            outs.update(run_diffusers(cfg, inp, device, dtype, args, record))
        else:
            print("  diffusers is not installed: its rows are skipped", flush=True)
            for impl in (i for i in args.impls if i.startswith("diffusers")):
                record(impl, {"error": "skipped: diffusers is not installed"})
    _annotate(case_rows, outs)
    save()


def _annotate(case_rows: dict, outs: dict) -> None:
    """Add ratio to diffusers-compiled and output differences (vs diffusers eager, vs our eager) to each row."""
    ref_s = case_rows.get("diffusers-compiled", {}).get("s_per_step")
    for impl, row in case_rows.items():
        if ref_s and "s_per_step" in row:
            row["ratio_vs_diffusers_compiled"] = row["s_per_step"] / ref_s
        for oracle, tag in (("diffusers", "vs_diffusers"), ("eager", "vs_eager")):
            if outs.get(impl) is not None and outs.get(oracle) is not None and impl != oracle:
                d = compare(outs[impl], outs[oracle])
                row[f"max_abs_{tag}"], row[f"rel_l2_{tag}"] = d["max_abs"], d["rel_l2"]


def _fmt(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return "-" if row.get(key) is None else format(row[key] * scale, fmt)


def _estimate(last, tokens: int, seconds: list[float], prior: float) -> float:
    """Expected wall time of the next case: the model's last case scaled by token count (never below it),
    else the mean case so far, else `prior`."""
    if last is not None:
        return last[0] * max(1.0, tokens / last[1])
    return statistics.mean(seconds) if seconds else prior


def print_table(rows) -> None:
    cols = [("model", 16), ("size", 5), ("refs", 4), ("impl", 18), ("s/step", 8), ("/diff-c", 7), ("TFLOP/s", 8),
            ("%ceil", 6), ("peakGiB", 8), ("relL2/diff", 10), ("relL2/eager", 11)]  # fmt: skip
    print("\n" + " ".join(f"{c:>{w}}" for c, w in cols))
    for r in rows:
        head = f"{r['model']:>16} {r['size']:>5} {r['refs']:>4} {r['impl']:>18}"
        if "s_per_step" not in r:
            print(f"{head}  {r.get('error', '')}")
            continue
        vals = [_fmt(r, "s_per_step", ".4f"), _fmt(r, "ratio_vs_diffusers_compiled", ".3f"), _fmt(r, "tflops", ".1f"),
                _fmt(r, "frac_bf16_ceiling", ".0f", 100), _fmt(r, "peak_mem_gib", ".1f"),
                _fmt(r, "rel_l2_vs_diffusers", ".2e"), _fmt(r, "rel_l2_vs_eager", ".2e")]  # fmt: skip
        print(head + " " + " ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols[4:])))


def main(argv=None):
    return run_main(_run, parse_args(argv))


def _run(args):
    device, dtype = bench_device(args)
    dynamo_limits()
    budget = Budget(args.time_budget_s)
    env = environment(device)
    ceilings = matmul_ceilings(device, args.ceiling_n)
    print(f"{env.get('card', env['device'])}: ceilings {ceilings}", flush=True)
    rows, skipped = [], []
    result = {"env": env, "ceilings": ceilings, "args": vars(args), "rows": rows, "skipped": skipped}
    save = functools.partial(write_json, args.out, result)
    cases = parse_cases(args)
    models = list(dict.fromkeys(m for m, _, _ in cases))
    seconds: list[float] = []  # wall time of each finished case
    for k, model_name in enumerate(models):
        deadline, last = budget.deadline_for_share(len(models) - k), None
        for _, size, refs in (c for c in cases if c[0] == model_name):
            tokens = (1 + refs) * (size // 16) ** 2 + args.n_txt
            est = _estimate(last, tokens, seconds, args.case_estimate_s)
            if time.monotonic() + est > min(deadline, budget.end):
                skipped.append(f"{model_name}:{size}:{refs} (time budget: ~{est:.0f} s needed)")
                print(f"{model_name} {size}² refs={refs}: skipped, ~{est:.0f} s would overrun the budget", flush=True)
                continue
            t0 = time.monotonic()
            run_case(model_name, size, refs, device, dtype, args, ceilings, rows, save)
            last = (time.monotonic() - t0, tokens)
            seconds.append(last[0])
    save()
    if skipped:
        print(f"skipped for time: {', '.join(skipped)}")
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
