"""Helpers shared by the benchmarks: seeded random weights by tensor name, inputs, timing, ceilings, JSON.

Weights are drawn per tensor from a generator seeded by (seed, tensor name), so two builds of the same model
(ours, and diffusers' through our key map) get identical values without both ever being in memory: the
diffusers build regenerates each BFL-named tensor and converts it with `transformer_bfl_to_diffusers`.
Matrices are normal(0, 1/fan_in), 1-D tensors (RMSNorm scales) are 1: the numbers match the official weights' cost.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import os
import platform
import statistics
import time
import zlib
from pathlib import Path

import torch

from fluxrt.loading.keymaps import transformer_bfl_to_diffusers
from fluxrt.models.transformer import Flux2
from fluxrt.sampling.latents import grid_ids, text_ids


# ----------------------------------------------------------------------------------------------- weights
def tensor_seed(name: str, seed: int) -> int:
    """A stable 63-bit seed for one tensor (crc32 of its name, mixed with the run seed)."""
    return (zlib.crc32(name.encode()) * 1_000_003 + seed) % (2**63 - 1)


@torch.no_grad()
def random_tensor(name: str, shape, device, dtype, seed: int) -> torch.Tensor:
    """The value tensor `name` gets in every build: normal(0, fan_in^-1/2) for matrices, ones for vectors."""
    if len(shape) == 1:
        return torch.ones(shape, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(tensor_seed(name, seed))
    return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, shape[1] ** -0.5, generator=g)


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random values for any model built with `to_empty`: weights normal(0, 1/fan_in), norm weights and
    variances 1, biases and means 0, integer buffers 0. For the components that diffusers never shares with us."""
    for name, t in module.state_dict().items():
        if not t.is_floating_point() or name.endswith(("bias", "running_mean")):
            t.zero_()
        elif t.ndim == 1:
            t.fill_(1.0)
        else:
            g = torch.Generator(device=t.device).manual_seed(tensor_seed(name, seed))
            t.normal_(0.0, t[0].numel() ** -0.5, generator=g)  # fan_in = in_channels x kernel area
    return module


def meta_flux2(cfg) -> Flux2:
    with torch.device("meta"):
        return Flux2(cfg)


@torch.no_grad()
def random_flux2(cfg, device, dtype=torch.bfloat16, seed: int = 0) -> Flux2:
    """Our model with seeded random weights, allocated directly on `device` (never on the CPU first)."""
    model = meta_flux2(cfg).to(dtype).to_empty(device=device)  # dtype first: dev in fp32 would be 128 GB
    for name, t in model.state_dict().items():
        t.copy_(random_tensor(name, t.shape, device, dtype, seed))
    return model.eval().requires_grad_(False)


def diffusers_available() -> str | None:
    """diffusers' version, or None (its rows are then skipped with a message)."""
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


@torch.no_grad()
def random_diffusers(cfg, device, dtype=torch.bfloat16, seed: int = 0):
    """diffusers' Flux2Transformer2DModel with exactly the weights `random_flux2(cfg, ..., seed)` gets.

    Each BFL tensor is regenerated on `device` and converted by our key map (QKV split, final-layer swap), one
    at a time; every diffusers key must be written exactly once.
    """
    from diffusers import Flux2Transformer2DModel

    from fluxrt.loading.save import diffusers_config

    ours = meta_flux2(cfg)
    kwargs = {k: v for k, v in diffusers_config(ours).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**kwargs)
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)  # nn.Module.to: diffusers' .to() warns here
    target, written = model.state_dict(), set()
    for name, t in ours.state_dict().items():
        for key, value in transformer_bfl_to_diffusers(
            {name: random_tensor(name, t.shape, device, dtype, seed)}
        ).items():
            if key not in target or key in written or target[key].shape != value.shape:
                raise KeyError(f"key map gave {key} {tuple(value.shape)}: not a (new) diffusers tensor of that shape")
            target[key].copy_(value)
            written.add(key)
    missing = sorted(set(target) - written)
    if missing or list(model.buffers()):
        raise KeyError(f"diffusers tensors left unwritten: {missing[:8]} (buffers: {len(list(model.buffers()))})")
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ inputs
def inputs(cfg, size: int, refs: int, device, dtype, n_txt: int = 512, seed: int = 1):
    """Batch-1 inputs of one step: a size² output image plus `refs` size² references (16 px per token side).

    Returns (x, x_ids, t, ctx, ctx_ids, guidance), drawn on the CPU from `seed` and moved, so every build
    and every process sees the same values.
    """
    side = size // 16
    ids = [grid_ids(side, side, 0)] + [grid_ids(side, side, 10 * (i + 1)) for i in range(refs)]
    x_ids = torch.cat(ids)[None]  # (1, (1 + refs) side², 4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, x_ids.shape[1], cfg.in_channels, generator=g)
    ctx = torch.randn(1, n_txt, cfg.context_in_dim, generator=g)
    t = torch.full((1,), 0.5)
    guidance = torch.full((1,), 4.0) if cfg.use_guidance_embed else None
    moved = [
        v if v is None else v.to(device)
        for v in (x.to(dtype), x_ids, t, ctx.to(dtype), text_ids(n_txt)[None], guidance)
    ]
    return tuple(moved)


def attention_flops(cfg, n_tokens: int) -> float:
    """FLOPs of one block's attention over `n_tokens` (QK^T and PV, 2 per multiply-add)."""
    return 2 * 2 * n_tokens * n_tokens * cfg.hidden_size


def step_flops(cfg, n_txt: int, n_img: int) -> float:
    """Matmul + attention FLOPs of one forward (2 per multiply-add); elementwise work is not counted."""
    h, m, n = cfg.hidden_size, cfg.mlp_hidden, n_txt + n_img
    double = 2 * n * (3 * h * h + h * h + 2 * m * h + m * h)  # each token goes through its own stream once
    single = 2 * n * ((3 * h + 2 * m) * h + (h + m) * h)
    attn = attention_flops(cfg, n)
    embed = 2 * (n_img * cfg.in_channels * h + n_txt * cfg.context_in_dim * h + n_img * h * cfg.in_channels)
    return cfg.depth * (double + attn) + cfg.depth_single_blocks * (single + attn) + embed


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, a synchronised host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize(device)
    return a.elapsed_time(b) / 1000


def time_steps(fn, device, warmup: int, iters: int | None, target_s: float = 3.0, max_iters: int = 10) -> list[float]:
    """Warm up, then time `iters` calls (None: enough for about `target_s`, 3 to `max_iters`; 2 for steps over
    `target_s`, whose warm-up is then cut to one call: a 28 s step must not spend minutes warming up)."""
    est = []
    for _ in range(warmup):
        est.append(time_once(fn, device))
        if est[-1] > target_s:
            break
    if iters is None:
        guess = min(est) if est else time_once(fn, device)
        iters = 2 if guess > target_s else max(3, min(max_iters, round(target_s / max(guess, 1e-6))))
    return [time_once(fn, device) for _ in range(iters)]


def first_call_s(fn, device) -> tuple[float, object]:
    """(wall seconds, return value) of one call of fn, host clock, synchronised: compile time + one step for a
    fresh compiled model."""
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - t0, value


def _scaled_mm_rowwise(qa, qb, sa, sb):
    """The product inside Fp8Linear's scaled_mm path, on operands quantized ahead (a ceiling, not a layer)."""
    return torch._scaled_mm(qa, qb.t(), scale_a=sa[:, None], scale_b=sb[None], out_dtype=torch.bfloat16,
                            use_fast_accum=True)  # fmt: skip


def matmul_ceilings(device, n: int = 8192) -> dict:
    """Measured bf16 and fp8 (rowwise _scaled_mm, bf16 out) TFLOP/s of an n³ product on random data."""
    out = {}
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    out["bf16_tflops"] = (
        2 * n**3 / statistics.median(time_steps(functools.partial(torch.mm, a, b), device, 3, 10)) / 1e12
    )
    try:
        from fluxrt.quant.fp8 import quantize_rowwise

        (qa, sa), (qb, sb) = quantize_rowwise(a), quantize_rowwise(b)  # quantized once: a pure fp8 product
        mm = functools.partial(_scaled_mm_rowwise, qa, qb, sa, sb)
        out["fp8_tflops"] = 2 * n**3 / statistics.median(time_steps(mm, device, 3, 10)) / 1e12
    except (RuntimeError, NotImplementedError) as e:  # no fp8 matmul on this device / build
        out["fp8_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def release(device) -> None:
    """Collect Python garbage and return the allocator's cached blocks (after a failure or a freed model)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def free(device) -> None:
    """`release`, after dropping dynamo's caches (compiled code and guards of the models just freed)."""
    torch._dynamo.reset()
    release(device)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max abs and relative L2 difference of two outputs (fp32 on the CPU)."""
    d = out.float() - ref.float()
    return {"max_abs": d.abs().max().item(), "rel_l2": (d.norm() / ref.float().norm().clamp(min=1e-30)).item()}


def dynamo_limits(n: int = 256) -> None:
    """Let every shape and variant compile (static shapes recompile per shape), and fail rather than silently
    falling back to eager when a limit is hit: a 'compiled' row must be compiled."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, n)
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


# ----------------------------------------------------------------------------------------------- records
def environment(device) -> dict:
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "diffusers": diffusers_available(),
        "date": datetime.date.today().isoformat(), "device": str(device), "host_cpus": os.cpu_count(),
    }  # fmt: skip
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, gpu_mem_gib=p.total_memory / 2**30, sms=p.multi_processor_count,
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))  # fmt: skip
    return env


def write_json(path, data) -> None:
    """Write atomically, so a run killed at its time limit still leaves the last complete file."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


class Budget:
    """Wall-clock budget: `left()` seconds remain, ending at `end` (monotonic clock); `deadline_for_share(k)`
    is the end of an equal share of what is left among k remaining parts."""

    def __init__(self, seconds: float | None):
        self.start, self.seconds = time.monotonic(), seconds
        self.end = float("inf") if seconds is None else self.start + seconds

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def deadline_for_share(self, parts: int) -> float:
        return time.monotonic() + self.left() / max(parts, 1)


def run_main(run, args):
    """Call `run(args)`; a dry run uses one CPU thread (tiny ops: far faster on a busy CPU, no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def add_case_args(ap, refs: bool = True) -> None:
    """The one-case options several benchmarks share: --model, --size, --refs (unless refs=False), --n-txt."""
    ap.add_argument("--model", default="flux.2-dev")
    ap.add_argument("--size", type=int, default=1024)
    if refs:
        ap.add_argument("--refs", type=int, default=0)
    ap.add_argument("--n-txt", type=int, default=512)


def bench_device(args) -> tuple[torch.device, torch.dtype]:
    """(cpu, fp32) for a dry run, else (cuda, bf16); exits with a message when there is no GPU."""
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on a GPU machine, or use --dry-run")
    return device, (torch.float32 if args.dry_run else torch.bfloat16)
