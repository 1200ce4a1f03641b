"""Where the time of one denoising step of a full-size FLUX.2 transformer goes: matmuls, attention, fused, other.

    PYTHONPATH=src python3 bench/profile_step.py --model flux.2-dev --size 1024 --refs 0 \
        --impls compiled,fp8-compiled,autotune --out $OUT/profile.json --time-budget-s 500
    PYTHONPATH=src python3 bench/profile_step.py --dry-run      # the whole logic on the CPU, tiny preset, seconds

One case (model, output size, number of same-size references; batch 1, 512 text tokens). The model is built once,
directly on the GPU from seeded random bf16 weights, and run as each requested variant, always in this order:
eager; compiled (`fluxrt.accel.compile_transformer`, default mode; on CUDA with the fused QK-norm + RoPE kernel);
compiled-unfused (the same with `fused=False`: the model's own ops compiled by inductor); autotune (mode
"max-autotune-no-cudagraphs", with inductor's coordinate-descent tuning on CUDA); fp8-compiled
(`fluxrt.quant.quantize_transformer`'s default layers, then compiled; last, since it replaces the Linears in
place). Between variants the model is decompiled and dynamo's caches are dropped. Per variant: s/step (median of
CUDA-event-timed steps after warm-up, the first call's wall time with the compile is first_call_s), then
--profile-steps more steps under `torch.profiler`, whose device kernels are summed per step and binned by name
(`classify`): gemm, attention, triton (inductor's fused kernels), elementwise (unfused ATen kernels, copies),
collective (NCCL), other. Off CUDA (--dry-run) the bins hold the CPU ops' self times instead.

Derived per variant: the step's FLOPs split into attention (4·N²·hidden per block, N = text + image tokens) and
linear (`step_flops` minus attention), the TFLOP/s of the gemm and attention kernels over them, the ideal step at
the bf16 matmul ceiling measured in the same run (fp8 rows: linears at the fp8 ceiling too), and the non-matmul
time, s/step minus gemm and attention time. JSON (with the environment and the command line) is rewritten after
every variant; a variant that the time budget cannot fit (estimated from the previous ones; autotune needs at least
--autotune-min-s) is skipped and listed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import re
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Budget,
    attention_flops,
    bench_device,
    dynamo_limits,
    environment,
    free,
    inputs,
    matmul_ceilings,
    random_flux2,
    run_main,
    step_flops,
    sync,
    write_json,
)
from transformer_step import run_impl

from fluxrt.accel.compile import compile_transformer, decompile
from fluxrt.config import get_preset
from fluxrt.quant.fp8 import quantize_transformer

IMPLS = ("eager", "compiled", "compiled-unfused", "autotune", "fp8-compiled")  # the order they run in
AUTOTUNE_MODE = "max-autotune-no-cudagraphs"
CATEGORIES = ("gemm", "attention", "triton", "elementwise", "collective", "other")
TOP = 25

# ------------------------------------------------------------------------------------------ kernel names
ATTENTION_WORDS = ("fmha", "flash", "sdpa", "attention", "attn")  # before gemm: fmha_cutlassF, flash<cutlass::...>
GEMM_WORDS = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "scaled_mm", "matmul", "gemv", "splitkreduce")
ELEMENTWISE_WORDS = ("elementwise", "vectorized", "reduce", "copy", "memcpy", "memset", "cat", "index", "fill",
                     "norm", "softmax")  # fmt: skip
_MM_OP = re.compile(r"(?:^|::|_)(?:add|b|baddb)?mm(?:$|[_.(<\s])")  # aten::mm, aten::addmm, aten::bmm (CPU ops)
_POINTWISE_OP = re.compile(r"^aten::(?:add|sub|mul|div|pow|neg|exp|rsqrt|sqrt|tanh|sigmoid|silu|gelu|sum|mean|"
                           r"clamp|where|abs|amax|maximum|minimum)_?$")  # fmt: skip


def classify(name: str) -> str:
    """The bin of a device kernel (or, off CUDA, a CPU op) by its name, case-insensitively: one of CATEGORIES.

    Inductor's Triton templates (triton_tem_*, max-autotune's matmuls and flex attention) go to what they compute;
    its other Triton kernels (triton_poi/per/red_fused_*, even those named after an addmm epilogue) to "triton".
    """
    n = name.lower()
    if "nccl" in n or "c10d" in n:  # NCCL's kernels (ncclDevKernel_SendRecv ...), the collective ops off CUDA
        return "collective"
    if n.startswith("triton_tem"):
        return "attention" if "attention" in n or "flex" in n else "gemm" if "mm" in n else "triton"
    if n.startswith("triton"):
        return "triton"
    if any(w in n for w in ATTENTION_WORDS):
        return "attention"
    if any(w in n for w in GEMM_WORDS) or _MM_OP.search(n):
        return "gemm"
    if any(w in n for w in ELEMENTWISE_WORDS) or _POINTWISE_OP.match(n):
        return "elementwise"
    return "other"


# ------------------------------------------------------------------------------------------------- FLOPs
def flop_split(cfg, n_txt: int, n_img: int) -> dict:
    """FLOPs of one step: total (`step_flops`), attention (QK^T and PV of every block), linear (the rest)."""
    total = step_flops(cfg, n_txt, n_img)
    attention = (cfg.depth + cfg.depth_single_blocks) * attention_flops(cfg, n_txt + n_img)
    return {"total": total, "attention": attention, "linear": total - attention}


# ----------------------------------------------------------------------------------------------- profiling
def _duration_us(event) -> float:
    """A device kernel's duration: its time range (every torch), else the device-time totals of this torch."""
    time_range = getattr(event, "time_range", None)
    if time_range is not None:
        return time_range.end - time_range.start
    for attr in ("self_device_time_total", "device_time_total", "self_cuda_time_total", "cuda_time_total"):
        if getattr(event, attr, None) is not None:
            return getattr(event, attr)
    return 0.0


DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # kineto activity types that are work on the device


def device_records(events) -> list[tuple[str, float]]:
    """(name, µs) of the kernels, copies and sets among profiler events. Not the other CUDA-timeline events:
    GPU user annotations (inductor's "## Call CompiledFxGraph ##" ranges, spanning the kernels), syncs, ranges."""
    from torch.autograd import DeviceType

    out = []
    for e in events:
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        activity = str(getattr(e, "activity_type", None) or "").lower()  # torch 2.13; older: is_user_annotation
        if (activity and activity not in DEVICE_WORK) or (not activity and getattr(e, "is_user_annotation", False)):
            continue
        out.append((e.name, _duration_us(e)))
    return out


def profile_events(fn, device, steps: int, trace: str | None = None) -> tuple[str, list[tuple[str, float]], float]:
    """Run `steps` calls under torch.profiler: ("cuda", [(kernel name, µs)], wall s) from the device kernels,
    or ("cpu", [(op name, self µs)], wall s) from the CPU ops when there are none (a CPU run). trace: also write
    the profiler's Chrome trace there (gzipped if the name ends in .gz; bench/trace_gaps.py reads it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    events = list(prof.events())
    kernels = device_records(events)
    if kernels:
        return "cuda", kernels, wall
    ops = [(e.name, getattr(e, "self_cpu_time_total", 0.0) or 0.0) for e in events
           if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU and not getattr(e, "is_async", False)]  # fmt: skip
    return "cpu", ops, wall


def summarize(records: list[tuple[str, float]], steps: int, top: int = TOP) -> dict:
    """Per-step totals of (name, µs) records: time and fraction per category, record count, the `top` names."""
    per_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, us in records:
        per_name[name][0] += 1
        per_name[name][1] += us
    total_ms = sum(us for _, us in records) / 1e3 / steps
    cats = {c: {"ms_per_step": 0.0, "calls_per_step": 0.0} for c in CATEGORIES}
    kernels = []
    for name, (count, us) in per_name.items():
        cat = classify(name)
        cats[cat]["ms_per_step"] += us / 1e3 / steps
        cats[cat]["calls_per_step"] += count / steps
        kernels.append({"name": name[:120], "calls_per_step": count / steps, "ms_per_step": us / 1e3 / steps,
                        "category": cat})  # fmt: skip
    for c in cats.values():
        c["fraction"] = c["ms_per_step"] / total_ms if total_ms > 0 else 0.0
    kernels.sort(key=lambda k: -k["ms_per_step"])
    return {"busy_ms_per_step": total_ms, "kernels_per_step": len(records) / steps, "categories": cats,
            "top_kernels": kernels[:top]}  # fmt: skip


def derived(row: dict, flops: dict, ceilings: dict, fp8: bool) -> dict:
    """TFLOP/s of the gemm and attention kernels, ideal step at the measured ceilings, and non-matmul time."""
    cats, s = row["categories"], row["s_per_step"]
    gemm_s, attn_s = cats["gemm"]["ms_per_step"] / 1e3, cats["attention"]["ms_per_step"] / 1e3
    out = {
        "gemm_tflops": flops["linear"] / gemm_s / 1e12 if gemm_s > 0 else None,
        "attention_tflops": flops["attention"] / attn_s / 1e12 if attn_s > 0 else None,
        "non_matmul_s": s - gemm_s - attn_s,
        "non_matmul_fraction": (s - gemm_s - attn_s) / s,
        "idle_s": s - row["busy_ms_per_step"] / 1e3,  # host gaps (launch overhead, syncs) on a GPU
        "tflops": flops["total"] / s / 1e12,
    }
    bf16 = ceilings.get("bf16_tflops")
    if bf16:
        out["ideal_s_bf16"] = flops["total"] / (bf16 * 1e12)
        out["frac_of_ideal_bf16"] = out["ideal_s_bf16"] / s
        if out["gemm_tflops"]:
            out["gemm_frac_bf16_ceiling"] = out["gemm_tflops"] / bf16
    if fp8 and ceilings.get("fp8_tflops") and bf16:  # as if every linear ran in fp8 (the default skips a few)
        out["ideal_s_fp8"] = flops["linear"] / (ceilings["fp8_tflops"] * 1e12) + flops["attention"] / (bf16 * 1e12)
        out["frac_of_ideal_fp8"] = out["ideal_s_fp8"] / s
        if out["gemm_tflops"]:
            out["gemm_frac_fp8_ceiling"] = out["gemm_tflops"] / ceilings["fp8_tflops"]
    return out


# ------------------------------------------------------------------------------------------------ variants
def _autotune_config(device, args):
    """Inductor's coordinate-descent tuning, for the autotune variant only (read at its compile, the first call)."""
    if device.type == "cuda" and args.compile_backend == "inductor":
        import torch._inductor.config as inductor_config

        return inductor_config.patch(coordinate_descent_tuning=True)
    return contextlib.nullcontext()


def run_variant(name, model, step, device, args, record) -> None:
    """Prepare `name` on `model` (compile / quantize), time it (`run_impl`), profile it; undo the compile."""
    compile_ = {"backend": args.compile_backend, "scope": args.compile_scope}
    ctx = _autotune_config(device, args) if name == "autotune" else contextlib.nullcontext()
    timed = {}
    with ctx:
        try:
            if name == "fp8-compiled":
                quantize_transformer(model)
            if name != "eager":
                compile_transformer(model, AUTOTUNE_MODE if name == "autotune" else None,
                                    fused=name != "compiled-unfused", **compile_)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a variant that cannot be prepared is a row, not the end of the run
            timed["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        else:
            run_impl(name, step, device, args, lambda _, res: timed.update(res))
        row = {"impl": name, **timed}
        if "s_per_step" in row:
            try:
                source, records, wall = profile_events(step, device, args.profile_steps)
                row.update(source=source, profiled_steps=args.profile_steps, profiled_wall_s_per_step=wall /
                           args.profile_steps, **summarize(records, args.profile_steps))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - the timing stands without its profile
                row["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        record(row)
    decompile(model)
    free(device)


def _needed(walls: dict, name: str, later: list[str], args) -> float:
    """Wall seconds to have left before variant `name`: each variant is expected to take the longest non-autotune
    variant so far (else --impl-estimate-s); autotune, whose compile takes minutes, at least --autotune-min-s, and
    it must leave the expected time of the variants after it (so fp8-compiled is not crowded out)."""
    plain = [s for impl, s in walls.items() if impl != "autotune"]
    est = max(plain) if plain else args.impl_estimate_s
    return max(est, args.autotune_min_s) + est * len(later) if name == "autotune" else est


# ------------------------------------------------------------------------------------------------ output
def _ms(row: dict, cat: str) -> str:
    c = row["categories"][cat]
    return f"{c['ms_per_step']:.1f} {100 * c['fraction']:3.0f}%"


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(result: dict) -> None:
    cols = [("impl", 12), ("s/step", 8), ("busy ms", 9), *((c, 13) for c in CATEGORIES), ("kern", 6),
            ("gemmTF/s", 9), ("attnTF/s", 9), ("ideal s", 8), ("%ideal", 6), ("nonmm ms", 9)]  # fmt: skip
    print("\n" + " ".join(f"{c:>{w}}" for c, w in cols))
    for r in result["rows"]:
        if "categories" not in r:
            print(f"{r['impl']:>12}  {r.get('error') or r.get('profile_error', '')}")
            continue
        vals = [f"{r['s_per_step']:.4f}", f"{r['busy_ms_per_step']:.1f}", *(_ms(r, c) for c in CATEGORIES),
                f"{r['kernels_per_step']:.0f}", _f(r.get("gemm_tflops"), ".4g"), _f(r.get("attention_tflops"), ".4g"),
                _f(r.get("ideal_s_bf16"), ".4f"), _f(r.get("frac_of_ideal_bf16") and 100 * r["frac_of_ideal_bf16"], ".0f"),
                f"{1e3 * r['non_matmul_s']:.1f}"]  # fmt: skip
        print(f"{r['impl']:>12} " + " ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols[1:])))
    for r in result["rows"]:
        for k in r.get("top_kernels", [])[:5]:
            print(f"  {r['impl']:>12} {k['ms_per_step']:9.3f} ms x{k['calls_per_step']:<5.0f} {k['category']:>11}  "
                  f"{k['name'][:80]}")  # fmt: skip
    if result["skipped"]:
        print(f"skipped for time: {', '.join(result['skipped'])}")


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="preset (default flux.2-dev; tiny for --dry-run)")
    ap.add_argument("--size", type=int, default=None, help="output side in pixels (default 1024; 64 for --dry-run)")
    ap.add_argument("--refs", type=int, default=0, help="same-size reference images")
    ap.add_argument("--impls", default=",".join(IMPLS), type=lambda s: [v for v in s.split(",") if v])
    ap.add_argument("--n-txt", type=int, default=512)
    ap.add_argument("--profile-steps", type=int, default=2, help="steps under the profiler, after the timed ones")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default: about 3 s worth, 3 to 10)")
    ap.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"))
    ap.add_argument("--compile-backend", default=None, help="default inductor (aot_eager for --dry-run)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="start no variant expected to end after it")
    ap.add_argument("--impl-estimate-s", type=float, default=None, help="first variant's seconds (120; dry run 10)")
    ap.add_argument("--autotune-min-s", type=float, default=240.0, help="budget left that autotune needs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ceiling-n", type=int, default=8192, help="side of the square bf16 / fp8 ceiling matmul")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU in fp32 with tiny sizes")
    args = ap.parse_args(argv)
    args.model = args.model or ("tiny" if args.dry_run else "flux.2-dev")
    args.size = args.size or (64 if args.dry_run else 1024)
    args.impl_estimate_s = args.impl_estimate_s or (10.0 if args.dry_run else 120.0)
    if args.dry_run:
        args.n_txt, args.warmup, args.iters, args.ceiling_n = 8, 1, 2, 256
    if args.compile_backend is None:  # inductor compiles C++ on a CPU: minutes, not seconds
        args.compile_backend = "aot_eager" if args.dry_run else "inductor"
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        ap.error(f"unknown impls {unknown}; known: {', '.join(IMPLS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.command = shlex.join(["bench/profile_step.py", *(sys.argv[1:] if argv is None else argv)])
    return run_main(_run, args)


def _run(args):
    budget = Budget(args.time_budget_s)
    device, dtype = bench_device(args)
    env, ceilings = environment(device), matmul_ceilings(device, args.ceiling_n)
    dynamo_limits()
    print(f"{env.get('card', env['device'])}: matmul ceilings (TFLOP/s) "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ceilings.items()), flush=True)  # fmt: skip
    cfg = get_preset(args.model).transformer
    inp = inputs(cfg, args.size, args.refs, device, dtype, args.n_txt)
    n_img = inp[0].shape[1]
    flops = flop_split(cfg, args.n_txt, n_img)
    rows, skipped = [], []
    result = {"env": env, "command": args.command, "args": vars(args), "ceilings": ceilings,
              "case": {"model": args.model, "size": args.size, "refs": args.refs, "n_img_tokens": n_img,
                       "n_txt": args.n_txt, **{f"{k}_tflop": v / 1e12 for k, v in flops.items()}},
              "categories": list(CATEGORIES), "rows": rows, "skipped": skipped}  # fmt: skip
    print(f"{args.model} {args.size}² refs={args.refs}: {n_img} image + {args.n_txt} text tokens, "
          f"{flops['total'] / 1e12:.1f} TFLOP/step ({100 * flops['attention'] / flops['total']:.0f}% attention)")  # fmt: skip

    def record(row):
        if "s_per_step" in row and "categories" in row:
            row.update(derived(row, flops, ceilings, row["impl"].startswith("fp8")))
        rows.append(row)
        write_json(args.out, result)
        if "categories" in row:
            shares = ", ".join(f"{c} {100 * row['categories'][c]['fraction']:.0f}%" for c in CATEGORIES)
            print(f"  {row['impl']:>12}: {row['s_per_step']:.4f} s/step ({shares})", flush=True)

    model = random_flux2(cfg, device, dtype, args.seed)
    step = functools.partial(model, *inp)
    walls: dict[str, float] = {}
    with torch.inference_mode():
        todo = [i for i in IMPLS if i in args.impls]
        for k, name in enumerate(todo):
            est = _needed(walls, name, todo[k + 1 :], args)
            if est > budget.left():
                skipped.append(f"{name} (time budget: ~{est:.0f} s needed, {budget.left():.0f} s left)")
                rows.append({"impl": name, "error": f"skipped: ~{est:.0f} s would overrun the time budget"})
                print(f"  {name:>12}: skipped, ~{est:.0f} s would overrun the budget", flush=True)
                continue
            t0 = time.monotonic()
            run_variant(name, model, step, device, args, record)
            walls[name] = rows[-1]["wall_s"] = time.monotonic() - t0
            write_json(args.out, result)
    write_json(args.out, result)
    del model, step
    free(device)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
