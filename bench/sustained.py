"""Matmul speed held for seconds, the way a denoising loop holds it, against the short burst the other benches time.

    PYTHONPATH=src python3 bench/sustained.py --out $OUT/sustained.json          # one H100/H200, about 3 minutes
    PYTHONPATH=src python3 bench/sustained.py --dry-run                          # the whole logic on the CPU

`matmul_ceilings` times an 8192³ product for a few milliseconds; a 50-step loop runs matmuls back to back for
twenty seconds, and a card at its power limit lowers its clock. Each workload here runs back to back for --seconds
after --idle-s of rest, as units of work, each unit timed with CUDA events, while `nvidia-smi` samples the SM clock,
power draw and clock-event reasons (power cap, thermal) every 100 ms:

- square: the n³ bf16 product of `matmul_ceilings` (n = --ceiling-n), 8 per unit.
- products: every matmul and attention of one forward of the model at --size, in the order the forward runs them,
  with the shapes the real model gives them (recorded from a forward on the meta device: `step_products`), random
  operands and nothing between them. Its time is what one step would take if all the elementwise work were free: a
  floor for any step made of these products, at the clock this card holds under them.
- products-ew: the products, each block linear followed by a streaming elementwise kernel (a negation) moving as
  many bytes as the elementwise work after it must read and write at the least (`elementwise_traffic`: every
  kernel fused as far as a separate kernel can be, nothing read twice). Its time is a floor for any step whose matmuls are cuBLAS's (no fused
  epilogues) and whose elementwise kernels run between them. products-ew-side: the same kernels on a second stream,
  beside the products: the floor if that work could hide behind the matmuls entirely.
- products-fp8: the same with the linears of the default fp8 layer choice (`fluxrt.quant.fp8.FP8_SKIP`) as
  rowwise-scaled fp8 products on operands quantized ahead (no quantization kernels: a floor for the fp8 step);
  products-fp8-all: every block linear in fp8 (`DEFAULT_SKIP`).
- step: the compiled transformer step (`fluxrt.accel.compile_transformer`, fused kernels), random full-size weights.

Per workload: TFLOP/s and mean SM clock and power over the first second (the burst) and over the second half of
the run (sustained), and one more unit under `torch.profiler`, binned as `profile_step.py` bins kernels (gemm,
attention, triton, ...). Off CUDA (--dry-run: tiny preset, fp32, fp8 emulated) there are no samples and no clock.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    _scaled_mm_rowwise,
    add_case_args,
    bench_device,
    environment,
    free,
    inputs,
    matmul_ceilings,
    meta_flux2,
    random_flux2,
    run_main,
    step_flops,
    sync,
    write_json,
)
from profile_step import profile_events, summarize

from fluxrt.config import get_preset
from fluxrt.quant.fp8 import DEFAULT_SKIP, FP8_SKIP, dequantize_rowwise, fp8_matmul_reference, quantize_rowwise, skipped

WORKLOADS = ("square", "products", "products-ew", "products-ew-side", "products-fp8", "products-fp8-all", "step")
SMI_FIELDS = ("clocks.sm", "power.draw", "temperature.gpu", "reasons")  # reasons: the first REASON_FIELDS known
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # newer drivers, older ones
POWER_CAP, THERMAL = 0x4, 0x20 | 0x40  # clock-event reason bits: software power cap; software/hardware thermal


# ------------------------------------------------------------------------------------------ the products
@dataclass(frozen=True)
class Product:
    """One matmul of a forward: a linear (name, m rows, k in, n out) or an attention (name "attention", m = batch
    x heads, k = query tokens, n = key tokens, d = head dim)."""

    name: str
    m: int
    k: int
    n: int
    d: int = 0

    @property
    def flops(self) -> float:
        if self.name == "attention":
            return 4.0 * self.m * self.k * self.n * self.d  # QK^T and PV
        return 2.0 * self.m * self.k * self.n


class _Attention(TorchFunctionMode):
    def __init__(self, out: list):
        super().__init__()
        self.out = out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.out.append(Product("attention", q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3]))
        return func(*args, **(kwargs or {}))


def step_products(cfg, size: int, refs: int = 0, n_txt: int = 512, shard: int = 1) -> list[Product]:
    """The linears and attentions of one forward at `size` with `refs` references, in the order it runs them, with
    their real shapes: recorded from a forward of the model built on the meta device (no memory, no math).
    shard: the products one rank of Ulysses sequence parallelism over `shard` GPUs runs (each stream's tokens
    split, the batch-1 products whole; attention over all tokens for 1/shard of the heads)."""
    model = meta_flux2(cfg).to(torch.bfloat16)
    out: list[Product] = []

    def hook(name, mod, args, _):
        x = args[0]
        out.append(Product(name, x.numel() // x.shape[-1], mod.in_features, mod.out_features))

    handles = [mod.register_forward_hook(functools.partial(hook, name)) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear)]  # fmt: skip
    x, x_ids, t, ctx, ctx_ids, guidance = inputs(cfg, size, refs, "meta", torch.bfloat16, n_txt)
    try:
        with torch.no_grad(), _Attention(out):
            model(x, x_ids, t, ctx, ctx_ids, guidance=guidance)
    finally:
        for h in handles:
            h.remove()
    if shard > 1:  # rows rounded up: SequenceParallel pads each stream's tokens to a multiple of the ranks
        out = [Product(p.name, -(-p.m // shard), p.k, p.n, p.d) if p.name == "attention" or p.m > 1 else p
               for p in out]  # fmt: skip
    return out


def elementwise_traffic(p: Product) -> int:
    """Elements (of the compute dtype) the elementwise work after block linear `p` must read plus write, at the
    least, per FLUX.2 block: after q, k, v: read, normed and rotated, written into the exchange's buffer (2 x out);
    after a gate-up product: SwiGLU reads 2F, writes F (1.5 x out); after a projection back to the hidden width
    (attention projection, MLP down, linear2): the gated residual and the next LayerNorm + modulation in one pass,
    reading x and the product, writing x and the modulated input (4 x out). A single block's linear1 (out = 3 D + 2 F,
    in = D) is q, k, v and gate-up at once. Anything else (embedders, modulation, final layer): 0."""
    name, rows = p.name, p.m
    if name.endswith("attn.qkv"):
        return 2 * rows * p.n
    if name.endswith("mlp.0"):
        return 3 * rows * p.n // 2
    if name.endswith(("attn.proj", "mlp.2", "linear2")):
        return 4 * rows * p.n
    if name.endswith("linear1"):
        qkv = 3 * p.k
        return rows * (2 * qkv + 3 * (p.n - qkv) // 2)
    return 0


def product_unit(products: list[Product], device, dtype, fp8_skip: tuple | None, elementwise: str | None = None):
    """A callable running every product once on random operands (one per distinct shape, made here); linears
    outside `fp8_skip` (None: none) as rowwise-scaled fp8 products on operands quantized ahead. elementwise:
    "serial" puts an elementwise kernel moving `elementwise_traffic(p)` elements after each linear p (half read,
    half written), "side" the same kernels on a second stream beside the products, None none."""
    made: dict = {}

    def operand(key, make):
        if key not in made:
            made[key] = make()
        return made[key]

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)

    fp8_mm = _scaled_mm_rowwise if device.type == "cuda" else _fp8_emulated
    calls, beside = [], []
    for p in products:
        if p.name == "attention":
            q = operand(("q", p.m, p.k, p.d), lambda p=p: rand(1, p.m, p.k, p.d))
            kv = operand(("kv", p.m, p.n, p.d), lambda p=p: rand(1, p.m, p.n, p.d))
            calls.append(functools.partial(F.scaled_dot_product_attention, q, kv, kv))
        elif fp8_skip is not None and not skipped(p.name, fp8_skip):
            qa, sa = operand(("qa", p.m, p.k), lambda p=p: quantize_rowwise(rand(p.m, p.k)))
            qw, sw = operand(("qw", p.k, p.n), lambda p=p: quantize_rowwise(rand(p.n, p.k)))
            calls.append(functools.partial(fp8_mm, qa, qw, sa, sw))
        else:
            a = operand(("a", p.m, p.k), lambda p=p: rand(p.m, p.k))
            w = operand(("w", p.k, p.n), lambda p=p: rand(p.n, p.k))
            calls.append(functools.partial(F.linear, a, w))
        n = elementwise_traffic(p) // 2 if elementwise else 0
        if n:
            src = operand(("ew-src", n), lambda n=n: rand(n))
            dst = operand(("ew-dst", n), lambda n=n: torch.empty(n, device=device, dtype=dtype))
            # an SM kernel, as the fused elementwise kernels are (a same-dtype copy_ could go to the copy engines)
            (beside if elementwise == "side" else calls).append(functools.partial(torch.neg, src, out=dst))

    side = torch.cuda.Stream(device) if elementwise == "side" and device.type == "cuda" else None

    def unit():
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for c in beside:  # all queued first: the side stream runs them while the products run
                c()
        for c in calls:
            c()
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)

    return unit


def _fp8_emulated(qa, qw, sa, sw):
    """The CPU's stand-in for `_scaled_mm_rowwise` (dry runs): the same product through the reference."""
    return fp8_matmul_reference(dequantize_rowwise(qa, sa), qw, sw)


# ------------------------------------------------------------------------------------------ the sampler
def _smi_target(device) -> str:
    """The card as nvidia-smi's -i names it: its PCI bus id (immune to CUDA_VISIBLE_DEVICES), else the index."""
    p = torch.cuda.get_device_properties(device)
    if hasattr(p, "pci_bus_id"):
        return f"{getattr(p, 'pci_domain_id', 0):08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
    return str(device.index or 0)


@functools.cache
def _smi_query(target: str) -> list[str] | None:
    """The nvidia-smi command querying SMI_FIELDS of card `target`, with the clock-event field this driver knows
    (else without it); None where nvidia-smi does not run. Probed once per card, not once per workload."""
    for reasons in (*REASON_FIELDS, None):
        fields = ",".join(["timestamp", *SMI_FIELDS[:3], *([reasons] if reasons else [])])
        cmd = ["nvidia-smi", "-i", target, f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
        try:
            if subprocess.run(cmd, check=False, capture_output=True, timeout=20).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            return None  # no nvidia-smi: no samples
    return None


class Sampler:
    """`nvidia-smi` sampling SMI_FIELDS every `period_ms` in the background while in use; `samples` then holds
    (host time s, {field: value}). Nothing (and no error) where there is no nvidia-smi or no CUDA device."""

    def __init__(self, device, period_ms: int = 100):
        self.device, self.period_ms, self.samples, self.proc = device, period_ms, [], None

    def __enter__(self):
        cmd = _smi_query(_smi_target(self.device)) if self.device.type == "cuda" else None
        if cmd is not None:
            self.proc = subprocess.Popen([*cmd, "-lms", str(self.period_ms)], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return
        self.proc.terminate()
        text, _ = self.proc.communicate(timeout=10)
        self.samples = [s for s in map(parse_sample, text.splitlines()) if s is not None]


def parse_sample(line: str):
    """One nvidia-smi CSV line -> (host time s, {field: float}), or None for a line it cannot read."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) not in (len(SMI_FIELDS), 1 + len(SMI_FIELDS)):  # without or with the reasons
        return None
    try:
        when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time
    except ValueError:
        return None
    values = {}
    for field, text in zip(SMI_FIELDS, parts[1:], strict=False):
        try:
            values[field] = float(int(text, 16)) if text.startswith("0x") else float(text)
        except ValueError:
            pass  # "[N/A]", "[Not Supported]"
    return when, values


def window_stats(samples, start: float, end: float) -> dict:
    """Mean clock, power and temperature of the samples in [start, end], and the fraction under a power cap or a
    thermal slowdown."""
    inside = [v for t, v in samples if start <= t <= end]
    out: dict = {"samples": len(inside)}
    for field, key in (("clocks.sm", "sm_mhz"), ("power.draw", "power_w"), ("temperature.gpu", "temp_c")):
        vals = [v[field] for v in inside if field in v]
        out[key] = statistics.fmean(vals) if vals else None
    reasons = [int(v["reasons"]) for v in inside if "reasons" in v]
    if reasons:
        out["power_capped"] = sum(bool(r & POWER_CAP) for r in reasons) / len(reasons)
        out["thermal"] = sum(bool(r & THERMAL) for r in reasons) / len(reasons)
    return out


# ------------------------------------------------------------------------------------------ running
def run_for(unit, flops: float, device, seconds: float, idle_s: float, burst_s: float = 1.0) -> dict:
    """One warm-up call, a rest of `idle_s`, then `unit` back to back for about `seconds` (the first call's time
    after the rest sets the count), each call timed with CUDA events (host clock off CUDA). TFLOP/s and samples
    over the first `burst_s` and the second half."""
    cuda = device.type == "cuda"
    unit()  # warm-up (a compile, cuBLAS's heuristics, the allocator)
    sync(device)
    with Sampler(device) as smp:
        t0 = time.time()
        time.sleep(idle_s)
        first = time.perf_counter()
        unit()
        sync(device)
        count = max(2, round(seconds / max(time.perf_counter() - first, 1e-6)))
        start = time.time()
        ends = []
        if cuda:
            begin = torch.cuda.Event(enable_timing=True)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
            begin.record()
            for ev in events:
                unit()
                ev.record()
            sync(device)
            ends = [begin.elapsed_time(ev) / 1e3 for ev in events]
        else:
            for _ in range(count):
                unit()
                ends.append(time.time() - start)
        time.sleep(0.3)  # a last sample after the work
    durations = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    total = ends[-1]

    def window(a: float, b: float) -> dict:
        idx = [i for i, e in enumerate(ends) if a < e <= b + 1e-9]
        s = sum(durations[i] for i in idx)
        row = {"units": len(idx), "s_per_unit": s / len(idx) if idx else None,
               "tflops": flops * len(idx) / s / 1e12 if s > 0 else None}  # fmt: skip
        return row | window_stats(smp.samples, start + a, start + b)

    return {"units": count, "seconds": total, "first_call_s": start - t0 - idle_s,
            "s_per_unit_median": statistics.median(durations), "burst": window(0.0, burst_s),
            "sustained": window(total / 2, total), "idle": window_stats(smp.samples, t0 + idle_s / 2, t0 + idle_s)}  # fmt: skip


def compiled_step(cfg, size, refs, n_txt, device, dtype, dry: bool):
    """The compiled full-size step as a unit (the model built on the device from seeded random weights)."""
    from fluxrt.accel.compile import compile_transformer

    model = random_flux2(cfg, device, dtype)
    compile_transformer(model, backend="aot_eager" if dry else "inductor")
    x, x_ids, t, ctx, ctx_ids, guidance = inputs(cfg, size, refs, device, dtype, n_txt)

    @torch.no_grad()
    def unit():
        model(x, x_ids, t, ctx, ctx_ids, guidance=guidance)

    return model, unit


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap)
    ap.add_argument("--shard", type=int, default=1, help="the products of one rank of Ulysses SP over N GPUs")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), type=lambda s: s.split(","))
    ap.add_argument("--seconds", type=float, default=15.0, help="run time of each workload")
    ap.add_argument("--idle-s", type=float, default=5.0, help="rest before each workload")
    ap.add_argument("--ceiling-n", type=int, default=8192)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU in fp32, tiny sizes, short runs")
    args = ap.parse_args(argv)
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {', '.join(bad)}; known: {', '.join(WORKLOADS)}")
    if args.shard > 1 and "step" in args.workloads:
        ap.error(f"--shard {args.shard} times the products one rank runs; the step workload runs whole: drop it")
    if args.dry_run:
        args.model, args.size, args.n_txt, args.ceiling_n = "tiny", 64, 16, 64
        args.seconds, args.idle_s = min(args.seconds, 0.3), 0.0
    return args


def main(argv=None):
    args = parse_args(argv)
    return run_main(_run, args)


def _run(args):
    device, dtype = bench_device(args)
    cfg = get_preset(args.model).transformer
    products = step_products(cfg, args.size, args.refs, args.n_txt, args.shard)
    n_img = (1 + args.refs) * (args.size // 16) ** 2
    report = {"env": environment(device), "command": shlex.join(sys.argv), "model": args.model, "size": args.size,
              "refs": args.refs, "n_txt": args.n_txt, "shard": args.shard,
              "ceilings": matmul_ceilings(device, args.ceiling_n),
              "step_flops": step_flops(cfg, args.n_txt, n_img),
              "products": {"count": len(products), "flops": sum(p.flops for p in products),
                           "attention_flops": sum(p.flops for p in products if p.name == "attention"),
                           "elementwise_bytes": sum(elementwise_traffic(p) for p in products) * dtype.itemsize},
              "workloads": {}}  # fmt: skip
    for name in args.workloads:
        model = None
        if name == "square":
            n = args.ceiling_n
            a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
            unit, flops = (lambda a=a, b=b: [torch.mm(a, b) for _ in range(8)]), 8 * 2.0 * n**3
        elif name == "step":
            model, unit = compiled_step(cfg, args.size, args.refs, args.n_txt, device, dtype, args.dry_run)
            flops = report["step_flops"]
        else:
            skip = {"products-fp8": FP8_SKIP, "products-fp8-all": DEFAULT_SKIP}.get(name)
            ew = {"products-ew": "serial", "products-ew-side": "side"}.get(name)
            unit, flops = product_unit(products, device, dtype, skip, ew), report["products"]["flops"]
        row = run_for(unit, flops, device, args.seconds, args.idle_s)
        kind, records, _ = profile_events(unit, device, 1)  # one more unit, still at the held clock
        row["profile"] = {"kind": kind} | summarize(records, 1, top=8)
        report["workloads"][name] = row
        sus, burst = row["sustained"], row["burst"]
        print(f"{name:18s} burst {burst['tflops'] or 0:7.1f} TFLOP/s at {burst.get('sm_mhz') or 0:5.0f} MHz, "
              f"sustained {sus['tflops'] or 0:7.1f} TFLOP/s, {sus['s_per_unit'] or 0:.4f} s/unit at "
              f"{sus.get('sm_mhz') or 0:5.0f} MHz {sus.get('power_w') or 0:4.0f} W", flush=True)  # fmt: skip
        del unit, model
        free(device)
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
