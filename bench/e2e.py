"""End-to-end FLUX.2 [dev] text-to-image time with random weights: text encoder, 50 denoising steps, VAE decode.

    PYTHONPATH=src python bench/e2e.py --impl compiled --out $OUT/e2e.json
    PYTHONPATH=src python bench/e2e.py --dry-run                      # tiny sizes on the CPU

Stages run one after another, each built on the GPU from seeded random weights, warmed up, timed, and freed
before the next is built (the three together need about 99 GB in bf16: more than an H100 holds; --resident
keeps them all, for an H200). The total is the sum of the timed stages; building weights is not counted.

Text encoder (assumptions, from the public config of Mistral-Small-3.1/3.2-24B, the text model of
transformers' `Mistral3Config`): hidden 5120, 40 layers truncated to the 30 that layers 10/20/30 need (final norm
dropped), 32 query heads, 8 KV heads, head_dim 128, MLP 32768, vocabulary 131072, RoPE theta 1e9, RMSNorm eps
1e-5. Only the language model is built: FLUX.2 never runs the vision tower for text. Prompts are random token ids,
left-padded to 512 like the Pixtral tokenizer (`--prompt-tokens` real tokens; no tokenizer is needed).
Denoiser: `fluxrt.sampling.run.sample` with our Flux2 (eager, compiled, fp8 or fp8-compiled), embedded
guidance 4.0, the FLUX.2 schedule. VAE: our AutoEncoder decoding a (1, 128, 64, 64) latent to 1024².
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bench_device,
    run_main,
    environment,
    fill_random_,
    free,
    peak_gib,
    random_flux2,
    reset_peak,
    sync,
    time_once,
    time_steps,
    write_json,
)

from fluxrt.accel import optimize
from fluxrt.config import AutoEncoderConfig, TextEncoderConfig, get_preset
from fluxrt.models.autoencoder import AutoEncoder
from fluxrt.models.text_encoder import TextEncoder
from fluxrt.sampling.latents import noise
from fluxrt.sampling.run import sample

# Mistral-Small-3.x text model (see the module docstring); num_hidden_layers is cut to max(output_layers).
MISTRAL_SMALL_TEXT = {
    "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 32768, "vocab_size": 131072, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
}  # fmt: skip
TINY_MISTRAL_TEXT = {
    "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
    "intermediate_size": 32, "vocab_size": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
}  # fmt: skip
TINY_TE = TextEncoderConfig("mistral3", "tiny", "tiny", 16, (1, 2, 3), max_length=32)
IMPLS = {  # the transformer's variant: arguments of fluxrt.accel.optimize
    "eager": {}, "compiled": {"compile": True}, "fp8": {"fp8": True}, "fp8-compiled": {"fp8": True, "compile": True},
}  # fmt: skip


def mistral_text_config(sizes: dict, num_layers: int):
    """The text config of transformers' Mistral3Config with `sizes`, cut to `num_layers` layers."""
    from transformers import Mistral3Config

    text = Mistral3Config().text_config
    for k, v in {**sizes, "num_hidden_layers": num_layers}.items():
        setattr(text, k, v)
    if getattr(text, "rope_parameters", None) is not None:  # transformers >= 5 keeps theta here
        text.rope_parameters = {**text.rope_parameters, "rope_theta": 1e9}
    else:
        text.rope_theta = 1e9
    return text


@torch.no_grad()
def random_text_encoder(te_cfg: TextEncoderConfig, sizes: dict, device, dtype, seed: int = 0) -> TextEncoder:
    """A truncated random Mistral decoder wrapped in our TextEncoder, built on `device` without a CPU copy."""
    from transformers import MistralModel

    text = mistral_text_config(sizes, max(te_cfg.output_layers))
    with torch.device("meta"):
        lm = MistralModel(text)
    lm = fill_random_(lm.to(dtype).to_empty(device=device), seed)
    lm.rotary_emb = type(lm.rotary_emb)(config=text).to(device)  # its inv_freq buffer is computed, not stored
    return TextEncoder(lm.eval(), types.SimpleNamespace(padding_side="left"), te_cfg)


@torch.no_grad()
def random_autoencoder(cfg: AutoEncoderConfig, device, dtype, seed: int = 0) -> AutoEncoder:
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    return fill_random_(ae.to(dtype).to_empty(device=device), seed).eval()


def prompt_batch(te_cfg: TextEncoderConfig, vocab: int, real: int, device, seed: int = 2):
    """(1, max_length) random ids and a mask with `real` tokens at the end (left padding, as for Mistral)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, te_cfg.max_length), generator=g)
    mask = torch.zeros_like(ids)
    mask[:, -real:] = 1
    return ids.to(device), mask.to(device)


def stage(name: str, fn, device, warmup: int, iters: int, results: dict):
    """Warm up, time `iters` calls (median), record seconds and peak memory; returns the last output."""
    reset_peak(device)
    out = {}

    def call():
        out["y"] = fn()

    times = time_steps(call, device, warmup, iters)
    results[name] = {"s": statistics.median(times), "min_s": min(times), "iters": len(times),
                     "peak_mem_gib": peak_gib(device)}  # fmt: skip
    print(f"{name:>13}: {results[name]['s']:.3f} s (median of {len(times)})", flush=True)
    return out["y"]


def encode_stage(te_cfg, sizes, device, dtype, args, reps, results):
    te = random_text_encoder(te_cfg, sizes, device, dtype, args.seed)
    ids, mask = prompt_batch(te_cfg, sizes["vocab_size"], min(args.prompt_tokens, te_cfg.max_length), device)
    return stage("text_encoder", functools.partial(te, ids, mask), device, 1, reps, results), te  # (1, 512, 15360)


def denoise_stage(spec, ctx, size, steps, device, dtype, args, results):
    flow = optimize(random_flux2(spec.transformer, device, dtype, args.seed), **IMPLS[args.impl])
    latent = noise([args.seed], size // 16, size // 16, device=device, dtype=dtype)  # (1, 128, h, w)
    run = functools.partial(sample, flow, latent, ctx, guidance=4.0)
    with torch.inference_mode():
        first = time_once(functools.partial(run, num_steps=1), device)  # compiles, for a compiled impl
        z = stage("denoise", functools.partial(run, num_steps=steps), device, 0, 1, results)
    results["denoise"].update(first_step_s=first, s_per_step=results["denoise"]["s"] / steps)
    return z, flow


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux.2-dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's (50 for dev)")
    ap.add_argument("--impl", default="eager", choices=sorted(IMPLS))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--vae-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--resident", action="store_true", help="keep every stage on the GPU (about 99 GB for dev)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny models and sizes on the CPU in fp32")
    return ap.parse_args(argv)


def main(argv=None):
    return run_main(_run, parse_args(argv))


def _run(args):
    device, dtype = bench_device(args)
    vae_dtype = torch.float32 if args.dry_run else getattr(torch, args.vae_dtype)
    spec = get_preset("tiny" if args.dry_run else args.model)
    te_cfg, sizes = (TINY_TE, TINY_MISTRAL_TEXT) if args.dry_run else (spec.text_encoder, MISTRAL_SMALL_TEXT)
    if te_cfg.family != "mistral3" or te_cfg.out_dim != spec.transformer.context_in_dim:
        raise SystemExit(f"this skeleton builds the Mistral3 encoder of dev only, not {spec.name}'s {te_cfg.family}")
    size = 64 if args.dry_run else args.size
    steps = args.steps or (2 if args.dry_run else spec.default_steps)
    reps = 1 if args.dry_run else 3
    results, keep = {}, []
    report = {"env": environment(device), "args": vars(args), "steps": steps, "stages": results}

    ctx, te = encode_stage(te_cfg, sizes, device, dtype, args, reps, results)
    keep.append(te) if args.resident else None
    del te
    free(device)
    z, flow = denoise_stage(spec, ctx, size, steps, device, dtype, args, results)
    keep.append(flow) if args.resident else None
    del flow
    free(device)
    ae = random_autoencoder(spec.autoencoder, device, vae_dtype, args.seed)
    with torch.inference_mode():
        img = stage("vae_decode", functools.partial(ae.decode, z), device, 1, reps, results)
    sync(device)
    report.update(total_s=sum(r["s"] for r in results.values()), image_shape=list(img.shape),
                  image_finite=bool(torch.isfinite(img).all()))  # fmt: skip
    print(f"{'total':>13}: {report['total_s']:.3f} s for a {size}² image, {steps} steps, impl {args.impl}")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
