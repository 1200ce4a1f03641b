"""Velocity error of every quantized weight path against the unquantized model, on seeded random weights.

    python bench/quant_error.py --model tiny --out tiny.json                       # CPU, seconds
    python bench/quant_error.py --model klein-slice --device cuda --out slice.json  # klein 4B width, 2 + 4 blocks

Weights: bench.common's seeded init (matrices normal(0, 1/fan_in), norm scales 1). Inputs: `--tokens` image tokens
(a square grid) and `--txt` text tokens of standard normal values, one sample per t in 0.1, 0.5, 0.9.
Error = ||v_quant - v_ref|| / ||v_ref|| per sample, where v_ref is the same model unquantized, computed in the
same `--dtype`. Every scheme quantizes the same layers: all block linears (skip = DEFAULT_SKIP: embedders,
modulations and final layer unquantized; fp8's own default FP8_SKIP also keeps the MLP products, bench/fp8_error.py):
    fp8, nf4, int4          fluxrt.quant.quantize (fp8 also quantizes activations per token)
    gguf-<type>             every block Linear as GgufLinear of that type, quantized by fluxrt.quant.gguf's plain
                            round-to-nearest quantisers (llama.cpp's searching quantisers do better)
The loaders' formats reduce to these layers (bnb 4-bit -> nf4, scaled fp8 -> fp8), bit-exactly (tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, random_flux2, write_json

from fluxrt.config import KLEIN_4B, get_preset
from fluxrt.quant import DEFAULT_SKIP, quantize, quantized_layers
from fluxrt.quant import gguf as G
from fluxrt.sampling.latents import grid_ids, text_ids

MODELS = {
    "tiny": get_preset("tiny").transformer,
    "klein-slice": dataclasses.replace(KLEIN_4B, depth=2, depth_single_blocks=4),  # full klein-4B width
}
SCHEMES = ("fp8", "nf4", "int4", "gguf-Q8_0", "gguf-Q6_K", "gguf-Q5_K", "gguf-Q4_K")
TIMES = (0.1, 0.5, 0.9)


def quantize_gguf(model: nn.Module, qtype: int, skip=DEFAULT_SKIP) -> nn.Module:
    """Every nn.Linear outside `skip` whose rows fit whole blocks -> GgufLinear of `qtype`, in place."""
    per = G.BLOCKS[qtype][0]
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or any(name == s or name.startswith(s + ".") for s in skip) or m.in_features % per:
            continue
        parent, _, child = name.rpartition(".")
        layer = G.GgufLinear(m.in_features, m.out_features, qtype, device=m.weight.device)
        layer.weight = G.quantize_blocks(m.weight.detach(), qtype)
        setattr(model.get_submodule(parent), child, layer)
    return model


def make_inputs(cfg, tokens: int, n_txt: int, device, dtype):
    side = int(tokens**0.5)
    g, b = torch.Generator().manual_seed(1), len(TIMES)
    x = torch.randn(1, side * side, cfg.in_channels, generator=g).expand(b, -1, -1)
    ctx = torch.randn(1, n_txt, cfg.context_in_dim, generator=g).expand(b, -1, -1)
    guidance = torch.full((b,), 4.0, device=device) if cfg.use_guidance_embed else None
    return (x.to(device, dtype), grid_ids(side, side)[None].to(device), torch.tensor(TIMES, device=device),
            ctx.to(device, dtype), text_ids(n_txt)[None].to(device), guidance)  # fmt: skip


@torch.no_grad()
def measure(cfg, scheme: str, inp, exact, device, dtype) -> dict:
    model = random_flux2(cfg, device, torch.float32)  # quantize from fp32 weights, then cast what stays unquantized
    start = time.perf_counter()
    if scheme.startswith("gguf-"):
        quantize_gguf(model, G.QTYPES[scheme[5:]])
    else:
        quantize(model, scheme, DEFAULT_SKIP)  # the same layers for every scheme (fp8's own default keeps more)
    quant_s = time.perf_counter() - start
    model.to(dtype)
    v = model(*inp)
    rel = ((v - exact).float().flatten(1).norm(dim=1) / exact.float().flatten(1).norm(dim=1)).tolist()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    layers = len(quantized_layers(model))
    del model
    return {"scheme": scheme, "rel_l2": [round(r, 5) for r in rel], "max_rel_l2": round(max(rel), 5),
            "layers": layers, "state_bytes": nbytes, "quantize_s": round(quant_s, 2)}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(MODELS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype of both models")
    p.add_argument("--tokens", type=int, default=256, help="image tokens (a square number)")
    p.add_argument("--txt", type=int, default=64, help="text tokens")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    cfg, device = MODELS[args.model], torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    inp = make_inputs(cfg, args.tokens, args.txt, device, dtype)
    with torch.no_grad():
        ref = random_flux2(cfg, device, torch.float32).to(dtype)
        exact = ref(*inp)
        ref_bytes = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
        del ref
    rows = []
    print(f"{args.model} on {device} ({args.dtype}), {args.tokens} image + {args.txt} text tokens, t = {TIMES}; "
          f"unquantized state {ref_bytes / 2**20:.1f} MiB")  # fmt: skip
    for scheme in args.schemes.split(","):
        row = measure(cfg, scheme, inp, exact, device, dtype)
        rows.append(row)
        print(f"{scheme:10} velocity rel L2 {', '.join(f'{r:.4f}' for r in row['rel_l2'])}   "
              f"{row['layers']:3} layers  state {row['state_bytes'] / 2**20:.1f} MiB", flush=True)  # fmt: skip
    if args.out:
        write_json(args.out, {"model": args.model, "config": dataclasses.asdict(cfg), "dtype": args.dtype,
                              "tokens": args.tokens, "txt": args.txt, "times": TIMES, "ref_bytes": ref_bytes,
                              "rows": rows, "environment": environment(device)})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
