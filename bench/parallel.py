"""Time FLUX.2 sampling (the transformer's denoising loop) under the parallel plans, random full-size weights.

    PYTHONPATH=src python3 -m torch.distributed.run --nproc-per-node 2 bench/parallel.py \
        --model flux.2-dev --sizes 1024 --steps 50 --plans 1 sp2 ring2 tp2 --out $OUT/parallel_2gpu_1024.json

Plans (the product of the numbers must be the world size, except "1"):
  1          one GPU (rank 0 alone; the others wait): the baseline, measured in the same job
  spN        Ulysses sequence parallel over N ranks        ringN    ring attention over N ranks
  tpN        tensor parallel over N ranks                  spAtpB / ringAtpB   A-way SP x B-way TP mesh
  batchN     each forward's batch rows over N ranks (`BatchParallel`: a CFG model's two halves, --images)
  PLAN:overlap   a Ulysses plan with `--overlap` (single blocks' MLP products run during their all-to-alls)
  PLAN:ce        a Ulysses plan with `--transport copy-engine` (all-to-alls on copy engines, each rank writing
                 into its peers' buffers); sp4:overlap:ce both
  PLAN:cepull    the same with each rank reading from its peers' buffers (`CopyEngineExchange(push=False)`; what
                 `:ce` was in the tenth session)
  PLAN:ceflat    `:ce` with q, k, v landing rank by rank and permuted by a kernel (`land=False`; what `:ce` was
                 before the eleventh session's last change)
  PLAN:ceperm    `:ce` with the attention's output permuted into head-chunk order before its exchange
                 (`land_output=False`; what `:ce` was before the fourteenth session: 0.3-0.4% slower)
  PLAN:unfused   with --compile: the model's own QK-norm + RoPE ops compiled by inductor instead of the fused
                 Triton kernel compile_transformer picks on CUDA (`fused=False`)
  PLAN:stack     with --overlap and the fused kernel: its q, k written to new tensors and stacked with v into the
                 send buffer, instead of written into the buffer directly (`sp.DIRECT_SEND`)
  PLAN:ceowncopy `:ce` with --overlap and the fused kernel: the single blocks' own q, k, v heads written into the
                 send buffer and copied to where they land (a 2-D copy), instead of written there by the kernel
                 (`sp.OWN_LANDED`; what `:ce` was before the sixteenth session)
  PLAN:ceheadmajor `:ce` with --overlap and the fused kernel: q, k, v written where they land, in head-major
                 order (as the other paths land them) instead of token-major (`sp.TOKEN_MAJOR`)
Run each compiled plan of full-size dev as its own job: on the H200s (ninth session) a second compiled plan in
the same process ran out of memory, the first plan's 64 GB still allocated (on the CPU it is freed; the JSON's
left_allocated_gib_rank says what a plan left behind). Per plan and size: one warm-up `sample()` of 2 steps,
then one timed `sample()` of --steps steps (plan "1": --base-steps if given, to spare device time on the slow
baseline; compare s/step then) (bf16, --images images (default 1), 512 text tokens, guidance 4; the model's
own mode: dev's guidance embedding, klein distilled, klein base real CFG with both halves batched into one
forward). The weights are random (std 1/sqrt(fan_in)),
built on the meta device and materialised per rank already sharded, so no rank ever holds more than its plan
needs (with --fp8 and a TP plan, each rank builds the whole bf16 model, quantizes it and then shards it).
A correctness check runs first for each plan: a shallow model of the same width (1 double + 2 single blocks,
real sliced weights) at the same size, parallel vs one process on the same rank, bf16; its max |diff| and
max |reference| are recorded. With --profile-steps K, one more `sample()` of K steps runs under torch.profiler and
rank 0's device kernels per step are binned as bench/profile_step.py does (gemm, attention, triton, elementwise,
collective, other), with the step's wall time and its compute-idle time (wall minus every non-collective kernel:
exposed communication plus launch gaps; collectives overlapped with compute do not count).
NCCL_* variables are recorded as found and never set.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fluxrt.accel import CUDAGraphStep, compile_transformer
from fluxrt.accel.compile import fused_kernels_available, use_fused_kernels
from fluxrt.config import get_preset
from fluxrt.models.transformer import Flux2
from fluxrt.parallel import (BatchParallel, Mesh, apply_tensor_parallel, init_from_env, make_mesh, nccl_env,
                             parallelize)  # fmt: skip
from fluxrt.parallel.plan import parse_plan as plan_from_name
from fluxrt.parallel import sp as sp_module
from fluxrt.parallel.sp import SequenceParallel
from fluxrt.sampling.latents import grid_ids, text_ids
from fluxrt.quant.fp8 import quantize_transformer
from fluxrt.sampling.run import sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fill_random_  # noqa: E402  (per-tensor seeds: the same values on every rank)
from profile_step import profile_events, summarize


def parse_plan(name: str) -> tuple[int, int, str, int]:
    """'1' -> (1, 1, 'ulysses', 1); 'ring2tp2' -> (2, 2, 'ring', 1); 'batch2' -> (1, 1, 'ulysses', 2)
    (`fluxrt.parallel.plan`)."""
    plan = plan_from_name(name)
    return plan.sp, plan.tp, plan.attention, plan.batch


def build(cfg, mesh: Mesh | None, attn: str, device, fp8: bool = False, compile: bool | str = False,
          overlap: bool = False, transport: str = "nccl", fused: bool = True) -> torch.nn.Module:  # fmt: skip
    """Random bf16 model for a plan, sharded on the meta device before any memory is allocated; then, as
    `fluxrt generate --quant fp8 --compile [--overlap]` does, fp8 linears, the sequence-parallel wrapper and
    compiled blocks (ring's send/recv as graph breaks)."""
    with torch.device("meta"):
        model = Flux2(cfg)
    tp = mesh is not None and mesh.tp > 1
    if tp and not fp8:
        apply_tensor_parallel(model, mesh.tp_group)
    model = fill_random_(model.to_empty(device=device).to(torch.bfloat16)).eval().requires_grad_(False)
    if fp8:  # quantized whole, then sharded, as `fluxrt generate --quant fp8 --parallel tp` does (bf16 peak: 61 GiB)
        quantize_transformer(model)
        if tp:
            apply_tensor_parallel(model, mesh.tp_group)
    wrapped = model
    if mesh is not None and mesh.sp > 1:  # before compiling: overlapped blocks compile with their own options
        wrapped = SequenceParallel(model, mesh.sp_group, attn, overlap=overlap, transport=transport)
    if compile:
        compile_transformer(model, None if compile is True else compile, fullgraph=mesh is None, fused=fused)
    return wrapped


def inputs(cfg, size: int, device, n_txt: int = 512, images: int = 1):
    g = torch.Generator(device=device).manual_seed(1)
    noise = torch.randn(images, cfg.in_channels, size // 16, size // 16, generator=g, device=device)
    ctx = torch.randn(images, n_txt, cfg.context_in_dim, generator=g, device=device)
    return noise.bfloat16(), ctx.bfloat16()


@torch.no_grad()
def check(cfg, size: int, mesh: Mesh | None, attn: str, device, batch: int = 1, overlap: bool = False,
          transport: str = "nccl", fused: bool = False, compile: bool | str = False) -> dict:  # fmt: skip
    """Shallow full-width model: the parallel plan (`batch` > 1: `BatchParallel` over one row per rank) vs the
    same weights in one process (bf16); `fused`: the plan with the fused QK-norm + RoPE kernel (on CUDA, as the
    compiled plan runs it) against the model's own ops in the one process; `compile`: then the plan's blocks
    compiled as `build` compiles them, against the same one-process output (check_compiled_max_abs_diff)."""
    if mesh is None and batch == 1:
        return {}
    small = dataclasses.replace(cfg, depth=1, depth_single_blocks=2)
    model = fill_random_(Flux2(small).to(device, torch.bfloat16)).eval()
    *args, g = forward_args(small, size, device, batch)
    ref = model(*args, guidance=g)
    if fused and fused_kernels_available(model):
        use_fused_kernels(model)
    par = BatchParallel(model) if batch > 1 else parallelize(model, mesh, attn, overlap=overlap, transport=transport)
    out = par(*args, guidance=g)
    diff = _all_max((out.float() - ref.float()).abs().max().item(), device)
    res = {"check_max_abs_diff": diff, "check_ref_max_abs": ref.float().abs().max().item()}
    if compile:
        compile_transformer(model, None if compile is True else compile, fullgraph=mesh is None, fused=fused)
        out = par(*args, guidance=g)
        res["check_compiled_max_abs_diff"] = _all_max((out.float() - ref.float()).abs().max().item(), device)
        torch._dynamo.reset()
    return res


def forward_args(cfg, size: int, device, batch: int = 1) -> tuple:
    """One forward's (x, x_ids, timesteps, ctx, ctx_ids, guidance) at t = 0.5 from the benchmark's inputs."""
    noise, ctx = inputs(cfg, size, device, images=batch)
    x = noise.flatten(2).transpose(1, 2)
    g = torch.full((batch,), 4.0, device=device) if cfg.use_guidance_embed else None
    return (x, grid_ids(size // 16, size // 16, device=device)[None], torch.full((batch,), 0.5, device=device), ctx,
            text_ids(ctx.shape[1], device)[None], g)  # fmt: skip


@torch.no_grad()
def graph_check(model, graphed, cfg, size: int, device, batch: int = 1, all_ranks: bool = True) -> dict:
    """The CUDA graph's forward against the same model without it, on the benchmark's inputs (two replays with
    different inputs first, so that the compared one follows its inputs); the largest difference over the ranks
    (`all_ranks`; False for plan "1", which rank 0 runs alone)."""
    *args, g = forward_args(cfg, size, device, batch)
    for scale in (0.5, 2.0):
        graphed(args[0] * scale, *args[1:], guidance=g)
    out, ref = graphed(*args, guidance=g), model(*args, guidance=g)
    diff = (out.float() - ref.float()).abs().max().item()
    return {"graph_max_abs_diff": _all_max(diff, device) if all_ranks else diff,
            "graph_ref_max_abs": ref.float().abs().max().item()}  # fmt: skip


def _all_max(v: float, device) -> float:
    if not dist.is_initialized():
        return v
    t = torch.tensor([v], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def sampler(model, cfg, size: int, device, mode: str = "embedded", images: int = 1):
    """run(steps) -> the latent of one `sample()` of the benchmark's inputs (guidance 4, the model's mode)."""
    noise, ctx = inputs(cfg, size, device, images=images)
    kw = {"mode": mode, "guidance": 4.0, "neg_ctx": torch.zeros_like(ctx) if mode == "cfg" else None}
    return lambda steps: sample(model, noise, ctx, num_steps=steps, **kw)


def timed(model, cfg, size: int, steps: int, device, mode: str = "embedded", images: int = 1) -> dict:
    run = sampler(model, cfg, size, device, mode, images)
    run(2)  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = run(steps)
    _sync(device)
    total = time.perf_counter() - t0
    finite = bool(torch.isfinite(out).all())
    return {"total_s": total, "s_per_step": total / steps, "output_finite": finite,
            "peak_mem_gib_rank": _peak_gib(device)}  # fmt: skip


def profiled(model, cfg, size: int, steps: int, device, mode: str = "embedded", images: int = 1,
             trace: str | None = None) -> dict:  # fmt: skip
    """One `sample()` of `steps` steps under torch.profiler (after `timed`, so compiled and warm): this rank's
    kernel time per step by bin, the wall time per step, and the compute-idle time (wall minus every kernel but
    the collectives); trace: the Chrome trace written there too."""
    run = sampler(model, cfg, size, device, mode, images)
    source, records, wall = profile_events(lambda: run(steps), device, 1, trace)
    summary = summarize(records, steps, top=12)
    compute = sum(c["ms_per_step"] for name, c in summary["categories"].items() if name != "collective")
    wall_ms = wall * 1e3 / steps
    return {"profile": summary | {"source": source, "steps": steps, "wall_ms_per_step": wall_ms,
                                  "compute_idle_ms_per_step": wall_ms - compute}}  # fmt: skip


VARIANTS = ("overlap", "ce", "cepull", "ceflat", "ceperm", "unfused", "stack", "ceowncopy", "ceheadmajor")


def run_plan(name: str, cfg, size: int, steps: int, info, fp8: bool = False, compile: bool | str = False,
             mode: str = "embedded", images: int = 1, profile_steps: int = 0,
             cuda_graph: bool = False, trace: str | None = None) -> dict | None:  # fmt: skip
    base, *variants = name.split(":")
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown plan variant {variant!r} in {name!r}; known: {', '.join(VARIANTS)} (e.g. "
                             f"sp4:overlap)")  # fmt: skip
    overlap = "overlap" in variants
    sp_module.DIRECT_SEND[0] = "stack" not in variants
    sp_module.OWN_LANDED[0] = "ceowncopy" not in variants
    sp_module.TOKEN_MAJOR[0] = "ceheadmajor" not in variants
    named = {"cepull": "copy-engine-pull", "ceflat": "copy-engine-flat", "ceperm": "copy-engine-permute-output",
             "ce": "copy-engine"}  # fmt: skip
    transport = next((named[v] for v in named if v in variants), "nccl")
    sp, tp, attn, batch = parse_plan(base)
    gpus = sp * tp * batch
    if gpus not in (1, info.world_size):
        raise ValueError(f"plan {name} needs {gpus} ranks, the job has {info.world_size}")
    mesh = make_mesh(sp, tp) if sp * tp > 1 else None
    res = {"plan": name, "sp": sp, "tp": tp, "batch": batch, "attention": attn if sp > 1 else None, "gpus": gpus,
           "mode": mode, "images": images, "transport": transport if sp > 1 else None,
           "fused": bool(compile) and "unfused" not in variants and info.device.type == "cuda",
           "direct_send": "stack" not in variants, "own_landed": "ceowncopy" not in variants,
           "token_major": "ceheadmajor" not in variants}  # fmt: skip
    if gpus > 1 or info.rank == 0:
        res |= check(cfg, size, mesh, attn, info.device, batch, overlap, transport, res["fused"], compile)
        model = build(cfg, mesh, attn, info.device, fp8, compile, overlap, transport, "unfused" not in variants)
        model = BatchParallel(model) if batch > 1 else model
        if cuda_graph:  # the whole forward captured once (after compiling, on its first call) and replayed
            plain, model = model, CUDAGraphStep(model)
            res |= {"cuda_graph": True} | graph_check(plain, model, cfg, size, info.device, images, gpus > 1)
        res |= timed(model, cfg, size, steps, info.device, mode, images)
        if profile_steps:
            res |= profiled(model, cfg, size, profile_steps, info.device, mode, images,
                            trace if info.rank == 0 else None)  # fmt: skip
        del model
        torch._dynamo.reset()  # drop compiled code before the next plan builds its model
        gc.collect()
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
            res["left_allocated_gib_rank"] = torch.cuda.memory_allocated(info.device) / 2**30
    peak = _all_max(res.get("peak_mem_gib_rank", 0.0), info.device)
    return res | {"peak_mem_gib_max_rank": peak} if info.rank == 0 else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux.2-dev")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--base-steps", type=int, default=None, help="timed steps of plan 1 (default --steps)")
    ap.add_argument("--profile-steps", type=int, default=0, help="then profile a sample() of this many steps")
    ap.add_argument("--trace", default=None, help="with --profile-steps: rank 0's Chrome trace of the profiled "
                    "sample() to this path (.json.gz; bench/trace_gaps.py reads it)")  # fmt: skip
    ap.add_argument("--plans", nargs="+", default=["1", "sp2", "ring2", "tp2"])
    ap.add_argument("--fp8", action="store_true", help="fp8 linears (default layer choice; TP shards them after)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each rank's blocks (warm-up compiles)")
    ap.add_argument("--compile-mode", default=None, help="with --compile: torch.compile's mode (e.g. "
                    "max-autotune-no-cudagraphs; the overlapped blocks keep their own options beside it)")
    ap.add_argument("--images", type=int, default=1, help="images per sample() (a batch plan splits them)")
    ap.add_argument("--cuda-graph", action="store_true", help="replay each plan's forward as one CUDA graph "
                    "(`CUDAGraphStep`, after compiling; collectives and copy-engine exchanges captured)")  # fmt: skip
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "parallel.json"))
    args = ap.parse_args(argv)
    info = init_from_env()
    spec = get_preset(args.model)
    cfg = spec.transformer
    records = []
    for size in args.sizes:
        base = None
        for name in args.plans:
            steps = args.base_steps if name == "1" and args.base_steps else args.steps
            compile = (args.compile_mode or True) if args.compile else False
            res = run_plan(name, cfg, size, steps, info, args.fp8, compile, spec.guidance_mode, args.images,
                           args.profile_steps, args.cuda_graph, args.trace)  # fmt: skip
            if dist.is_initialized():
                dist.barrier()
            if info.rank == 0:
                base = res["s_per_step"] if name == "1" else base
                res |= {"model": args.model, "size": size, "steps": steps, "world_size": info.world_size}
                res |= {"speedup_vs_1gpu": base / res["s_per_step"]} if base else {}
                print(json.dumps(res), flush=True)
                records.append(res)
                with open(args.out, "w") as f:  # after every plan: a job cut short keeps what it measured
                    json.dump([r | run_info(info.device, args) for r in records], f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_info(device, args) -> dict:
    cuda = device.type == "cuda"
    return {
        "card": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None, "nccl_env": nccl_env(),
        "date": datetime.date.today().isoformat(), "impl": f"fluxrt {'compiled' if args.compile else 'eager'}{f' ({args.compile_mode})' if args.compile and args.compile_mode else ''} {'fp8' if args.fp8 else 'bf16'} (SDPA local attention){' CUDA graph' if args.cuda_graph else ''}",
    }  # fmt: skip


if __name__ == "__main__":
    main()
