"""Time the attention kernels fluxrt can route the transformer's attention through, at FLUX.2 dev's shapes.

    PYTHONPATH=src python bench/attention_kernels.py --out $OUT/attention.json
    PYTHONPATH=src python bench/attention_kernels.py --dry-run     # CPU, tiny shapes: only "sdpa" and "math" run

48 heads x 128 (dev; klein 4B has 24, 9B 32), batch 1, bf16, no mask; lengths = image + 512 text tokens
(1024²: 4608, 1024² + one 1024² reference: 8704, 2048²: 16896). Per kernel: median of CUDA-event-timed calls,
TFLOP/s over 4·L²·H·D, and the relative L2 difference to PyTorch's default pick ("sdpa") on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_device, compare, environment, run_main, time_steps, write_json  # noqa: E402

import fluxrt.accel  # noqa: E402,F401 - registers the named kernels
from fluxrt.models.attention import attention_backends  # noqa: E402

LENGTHS = {"1024²": 4608, "1024²+1ref": 8704, "2048²": 16896}


def run(args) -> dict:
    device, dtype = bench_device(args)
    kernels = args.kernels if device.type == "cuda" else [k for k in args.kernels if k in ("sdpa", "math")]
    lengths = {"tiny": 64} if args.dry_run else LENGTHS
    heads = 2 if args.dry_run else args.heads
    res = {"env": environment(device), "heads": heads, "head_dim": 128, "rows": []}
    gen, backends = torch.Generator(device).manual_seed(0), attention_backends()
    for label, n in lengths.items():
        q, k, v = (torch.randn(1, heads, n, 128, device=device, dtype=dtype, generator=gen) for _ in range(3))
        ref = backends["sdpa"](q, k, v).float()
        flops = 4 * n * n * heads * 128
        for name in kernels:
            fn = backends[name]
            try:
                out = fn(q, k, v)
                times = time_steps(lambda: fn(q, k, v), device, 3, args.iters)
            except Exception as e:  # noqa: BLE001 - a kernel that can't run these shapes is a row, not a crash
                res["rows"].append({"length": label, "tokens": n, "kernel": name, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{label:>11} {name:>6}: FAILED {type(e).__name__}", flush=True)
                continue
            s = statistics.median(times)
            row = {"length": label, "tokens": n, "kernel": name, "ms": s * 1e3, "tflops": flops / s / 1e12,
                   **{f"vs_sdpa_{key}": val for key, val in compare(out.float(), ref).items()}}  # fmt: skip
            res["rows"].append(row)
            print(f"{label:>11} {name:>6}: {row['ms']:8.3f} ms {row['tflops']:6.0f} TFLOP/s "
                  f"rel L2 vs sdpa {row['vs_sdpa_rel_l2']:.2e}", flush=True)  # fmt: skip
            write_json(args.out, res)
        del q, k, v, ref
    write_json(args.out, res)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="sdpa,flash,cudnn", type=lambda s: s.split(","))
    ap.add_argument("--heads", type=int, default=48)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    known = attention_backends()
    unknown = [k for k in args.kernels if k not in known]
    if unknown:
        ap.error(f"unknown kernels {unknown}; known: {', '.join(sorted(known))}")
    return run_main(run, args)


if __name__ == "__main__":
    main()
