"""Time one block of a full-size model, compiled, under kernel variants, and list its kernels (issue 5).

    PYTHONPATH=src python bench/block_kernels.py --out $OUT/blocks.json --code $OUT/code.txt
    PYTHONPATH=src python bench/block_kernels.py --dry-run          # the tiny preset on the CPU, all the logic

One single-stream and one double-stream block of --model (seeded random weights as bench/common draws them),
the tokens of a --size² image plus --n-txt text tokens, batch 1, bf16. For each variant the block is compiled
(torch.compile, fullgraph, static shapes) afresh and timed: the first call (compile + one forward), then the
median of CUDA-event-timed forwards; a profiled run binned by kernel (bench/profile_step's bins); and the
output's difference to the eager block with the reference ops. A block is ~1/56 of a dev step: this measures
the elementwise kernels around the matmuls without building the 64 GB model.

Variants: base (the model's ops as they are), nr (QK-norm + RoPE through fluxrt.accel.norm_rope's Triton kernel,
output in (B, L, H, D) order), nr-bhld (the same kernel writing (B, H, L, D)), cdt (inductor's coordinate-descent
tuning of its own Triton kernels' launch parameters), nr-cdt (both), nr-mk (the kernel, and inductor's
multi-kernel: each reduction compiled persistent and looped, the faster picked at run time; the LayerNorm over
6144 channels is a looped reduction by default, reading its rows twice). --code writes the code inductor generated
for each block under the variants named by --code-variants.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_case_args,
    bench_device,
    compare,
    environment,
    fill_random_,
    first_call_s,
    inputs,
    run_main,
    time_steps,
    write_json,
)
from profile_step import profile_events, summarize

import fluxrt.accel  # noqa: F401 - registers the fused kernels
from fluxrt.config import get_preset
from fluxrt.models.attention import norm_rope_kernel, rope
from fluxrt.models.transformer import DoubleStreamBlock, SingleStreamBlock

VARIANTS = {  # name: (norm-rope kernel, inductor config patch)
    "base": ("reference", {}),
    "nr": ("triton-blhd", {}),
    "nr-bhld": ("triton", {}),
    "cdt": ("reference", {"coordinate_descent_tuning": True}),
    "nr-cdt": ("triton-blhd", {"coordinate_descent_tuning": True}),
    "nr-mk": ("triton-blhd", {"triton.multi_kernel": 1}),
}
BLOCKS = ("single", "double")


def build(kind: str, cfg, device, dtype, seed: int):
    h, m = cfg.hidden_size, cfg.mlp_hidden
    cls = SingleStreamBlock if kind == "single" else DoubleStreamBlock
    with torch.device("meta"):
        block = cls(h, cfg.num_heads, m)
    block = block.to_empty(device=device).to(dtype)
    return fill_random_(block, seed).eval().requires_grad_(False)


def block_inputs(kind: str, cfg, size: int, n_txt: int, device, dtype):
    """(args of the block's forward) for a size² image and n_txt text tokens; modulations small and seeded."""
    x, x_ids, _, _, ctx_ids, _ = inputs(cfg, size, 0, device, dtype, n_txt)
    pe = rope(torch.cat([ctx_ids, x_ids], dim=1), cfg.axes_dim, cfg.theta)
    g = torch.Generator().manual_seed(7)
    h, n_img = cfg.hidden_size, x.shape[1]

    def mod():
        return tuple((0.3 * torch.randn(1, 1, h, generator=g)).to(device, dtype) for _ in range(3))

    def tokens(n):
        return torch.randn(1, n, h, generator=g).to(device, dtype)

    if kind == "single":
        return (tokens(n_txt + n_img), pe, mod(), n_txt)
    return (tokens(n_img), tokens(n_txt), pe, (mod(), mod()), (mod(), mod()))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def run_variant(name, block, args_, device, args, ref) -> tuple[dict, str]:
    kernel, patch = VARIANTS[name]
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    cfg_patch = inductor_config.patch(patch) if patch else contextlib.nullcontext()
    with norm_rope_kernel(kernel), cfg_patch, torch.inference_mode():
        compiled = torch.compile(block, fullgraph=True, dynamic=False)

        def step():
            return compiled(*args_)

        first, (out, codes) = first_call_s(lambda: run_and_get_code(step), device)
        times = time_steps(step, device, args.warmup, args.iters)
        source, records, _ = profile_events(step, device, args.profile_steps)
        prof = summarize(records, args.profile_steps, top=args.top)
    diff = compare(_first(out).float().cpu(), ref)
    row = {"variant": name, "kernel": kernel, "inductor_patch": patch, "first_call_s": first,
           "ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "iters": len(times),
           "profile_source": source, **prof, "max_abs_vs_eager": diff["max_abs"], "rel_l2_vs_eager": diff["rel_l2"]}  # fmt: skip
    return row, "\n\n".join(codes)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap, refs=False)
    ap.add_argument("--blocks", default=",".join(BLOCKS), type=lambda s: s.split(","))
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--code", default=None, help="write inductor's generated code here")
    ap.add_argument("--code-variants", default="base,nr", type=lambda s: s.split(","))
    ap.add_argument("--dry-run", action="store_true", help="tiny preset, 64², 16 text tokens, fp32, CPU")
    args = ap.parse_args(argv)
    for bad in (set(args.variants) - set(VARIANTS), set(args.blocks) - set(BLOCKS)):
        if bad:
            ap.error(f"unknown {sorted(bad)}; known: {', '.join([*VARIANTS, *BLOCKS])}")
    if args.dry_run:
        args.model, args.size, args.n_txt, args.iters, args.warmup, args.profile_steps = "tiny", 64, 16, 2, 1, 1
    return args


def _run(args):
    device, dtype = bench_device(args)
    cfg = get_preset(args.model).transformer
    result = {"env": environment(device), "command": " ".join(sys.argv), "args": vars(args), "rows": []}
    code_parts = []
    for kind in args.blocks:
        block = build(kind, cfg, device, dtype, args.seed)
        args_ = block_inputs(kind, cfg, args.size, args.n_txt, device, dtype)
        with torch.inference_mode():
            ref = _first(block(*args_)).float().cpu()
        for name in args.variants:
            try:
                row, code = run_variant(name, block, args_, device, args, ref)
            except Exception as e:  # noqa: BLE001 - a failed variant is recorded and the others still run
                row, code = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}, ""
            row = {"block": kind, **row}
            result["rows"].append(row)
            write_json(args.out, result)
            if name in args.code_variants and code:
                code_parts.append(f"# ===== {kind} block, variant {name}\n{code}")
            if "ms" in row:
                top = ", ".join(f"{k['name'][:48]} {k['ms_per_step']:.3f}" for k in row["top_kernels"][:6])
                print(f"{kind:>6} {name:>8}: {row['ms']:.3f} ms (min {row['min_ms']:.3f}), first call "
                      f"{row['first_call_s']:.1f} s, rel L2 vs eager {row['rel_l2_vs_eager']:.2e}; {top}", flush=True)  # fmt: skip
            else:
                print(f"{kind:>6} {name:>8}: {row['error']}", flush=True)
        del block, args_
    if args.code:
        Path(args.code).write_text("\n\n".join(code_parts))
    return result


def main(argv=None):
    return run_main(_run, parse_args(argv))


if __name__ == "__main__":
    main()
