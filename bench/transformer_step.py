"""Time one denoising step of a full-size FLUX.2 transformer with random weights, built directly on the GPU.

    python bench/transformer_step.py --model flux.2-dev --size 1024 --refs 0 --out results.json

Prints and writes s/step (median of CUDA-event-timed steps after warm-up), achieved TFLOP/s, and peak memory.
No checkpoint is needed: the model is built on the meta device and materialised on the GPU with random weights
(normal with std 1/sqrt(fan_in), norm scales 1), so the numbers match the official weights' cost exactly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics

import torch

from fluxrt.config import get_preset
from fluxrt.models.transformer import Flux2
from fluxrt.sampling.latents import grid_ids, text_ids


def random_model(cfg, device, dtype=torch.bfloat16, seed=0) -> Flux2:
    """Full-size model with random weights, allocated directly on `device` (never on the CPU)."""
    with torch.device("meta"):
        model = Flux2(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
    return model.eval().requires_grad_(False)


def step_flops(cfg, n_txt: int, n_img: int) -> float:
    """Matmul + attention FLOPs of one forward (2 per multiply-add); elementwise work is not counted."""
    h, m, n = cfg.hidden_size, cfg.mlp_hidden, n_txt + n_img
    double = 2 * n * (3 * h * h + h * h + 2 * m * h + m * h)  # each token goes through its own stream once
    single = 2 * n * ((3 * h + 2 * m) * h + (h + m) * h)
    attn = 2 * 2 * n * n * h  # QK^T and PV
    embed = 2 * (n_img * cfg.in_channels * h + n_txt * cfg.context_in_dim * h + n_img * h * cfg.in_channels)
    return cfg.depth * (double + attn) + cfg.depth_single_blocks * (single + attn) + embed


def inputs(cfg, size: int, refs: int, device, dtype=torch.bfloat16, n_txt: int = 512):
    side = size // 16
    ids = [grid_ids(side, side, 0, device)] + [grid_ids(side, side, 10 * (i + 1), device) for i in range(refs)]
    x_ids = torch.cat(ids)[None]
    x = torch.randn(1, x_ids.shape[1], cfg.in_channels, device=device, dtype=dtype)
    ctx = torch.randn(1, n_txt, cfg.context_in_dim, device=device, dtype=dtype)
    t = torch.full((1,), 0.5, device=device)
    g = torch.full((1,), 4.0, device=device) if cfg.use_guidance_embed else None
    return x, x_ids, t, ctx, text_ids(n_txt, device)[None], g


def time_steps(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return times


def matmul_ceiling(device, n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = statistics.median(time_steps(lambda: a @ b, 3, iters))
    return 2 * n**3 / t / 1e12


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux.2-dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--refs", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = get_preset(args.model).transformer
    ceiling = matmul_ceiling(dev)
    model = random_model(cfg, dev)
    x, x_ids, t, ctx, ctx_ids, g = inputs(cfg, args.size, args.refs, dev)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        times = time_steps(lambda: model(x, x_ids, t, ctx, ctx_ids, guidance=g), args.warmup, args.iters)
    s = statistics.median(times)
    flops = step_flops(cfg, ctx.shape[1], x.shape[1])
    res = {
        "model": args.model, "size": args.size, "refs": args.refs, "s_per_step": s, "min_s": min(times),
        "tflops": flops / s / 1e12, "step_tflop": flops / 1e12, "matmul_ceiling_tflops": ceiling,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "card": torch.cuda.get_device_name(),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(), "impl": "fluxrt eager bf16 (SDPA)",
    }  # fmt: skip
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
