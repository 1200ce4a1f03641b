"""Where the fp8 (e4m3) error of the transformer comes from: per layer type, per block group, and with depth.

    python bench/fp8_error.py --model flux.2-klein-4b --depth 2 4 --streams default --out fp8_error.json  # CPU
    python bench/fp8_error.py --model flux.2-klein-4b --device cuda --side 64 --out $OUT/fp8_error.json     # GPU

Random weights exactly as `bench/common.random_flux2` draws them (normal(0, 1/fan_in) by tensor name, norm scales
1), built one block at a time on the CPU in fp32 (klein-4B in fp32 would be 15.5 GB; one block is at most 1 GB), so
any depth runs in a few GB. Every "stream" is the same forward with a different quantization rule, run side by
side block by block; the exact fp32 stream is the reference (on a GPU too: fp32, TF32 off; the GPU draws other
random values than the CPU, from the same distribution). The fp8 product is emulated exactly as
`fluxrt.quant.fp8.fp8_matmul_reference` computes it: both operands rounded to e4m3 with rowwise scales
(`quantize_rowwise`), dequantized, multiplied in fp32.

A stream is a rule, written as words: a base mode for every block Linear, then edits, e.g.
  "w8a8"                       every block Linear fp8 (weights rowwise, activations per token): DEFAULT_SKIP
  "w8a8 -linear2 -mlp_out"     ... except the single blocks' linear2 and the double blocks' mlp.2
  "none +qkv"                  only the double blocks' qkv layers
  "w8a8 -single[16:20]"        all but the last four single blocks;  "-txt": all but the text stream's layers
  base modes: none, w8a8, w8 (weight only), a8 (activations only), bf16 (both operands rounded to bf16: the floor)
Selectors: qkv, proj, mlp_in, mlp_out (double blocks), linear1, linear2 (single), their parts linear1.qkv,
linear1.mlp (output rows) and linear2.attn, linear2.mlp (input columns), img, txt (double-block stream), double,
single, double[a:b], single[a:b].

Per stream it reports the velocity's relative L2 error per t, the hidden-state error after every block, and the
share of the step's FLOPs (matmuls + attention, at --flops-size, 512 text tokens) that the rule runs in fp8.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import itertools
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, random_flux2, random_tensor, time_steps, write_json

from fluxrt.config import get_preset
from fluxrt.models.attention import rope
from fluxrt.models.transformer import DoubleStreamBlock, Flux2, SingleStreamBlock
from fluxrt.quant.fp8 import (
    DEFAULT_SKIP,
    E4M3,
    E4M3_MAX,
    FP8_SKIP,
    dequantize_rowwise,
    quantize_rowwise,
    quantize_transformer,
)  # fmt: skip
from fluxrt.sampling.latents import grid_ids, text_ids

TYPES = {  # layer type -> names inside a block
    "qkv": ("img_attn.qkv", "txt_attn.qkv"), "proj": ("img_attn.proj", "txt_attn.proj"),
    "mlp_in": ("img_mlp.0", "txt_mlp.0"), "mlp_out": ("img_mlp.2", "txt_mlp.2"),
    "linear1": ("linear1",), "linear2": ("linear2",),
}  # fmt: skip
PARTS = {"linear1": ("qkv", "mlp"), "linear2": ("attn", "mlp")}  # linear1 rows [q|k|v|gate|up], linear2 cols [attn|mlp]
BASES = ("none", "w8a8", "w8", "a8", "bf16")


def survey(cfg) -> list[str]:
    """The "default" streams: the four bases, each layer type and each part of linear1 / linear2 alone, the text
    stream alone, the double blocks alone, each quarter of the single blocks alone, the first and last block alone."""
    q = [round(k * cfg.depth_single_blocks / 4) for k in range(5)]
    parts = [f"none +{layer}.{part}" for layer, ps in PARTS.items() for part in ps]
    return ["w8a8", "bf16", "w8", "a8", *(f"none +{t}" for t in TYPES), *parts, "none +txt", "none +double",
            *(f"none +single[{a}:{b}]" for a, b in itertools.pairwise(q) if b > a), "none +double[0:1]",
            f"none +single[{cfg.depth_single_blocks - 1}:{cfg.depth_single_blocks}]"]  # fmt: skip


_SLICE = re.compile(r"^(double|single)\[(\d+):(\d+)\]$")


# --------------------------------------------------------------------------------------------------- rules
def selects(sel: str, kind: str, idx: int, name: str, part: str | None = None) -> bool:
    """Does selector `sel` pick (part `part` of) layer `name` of block `idx` of `kind` ("double" / "single")?"""
    if sel in TYPES:
        return name in TYPES[sel]
    layer, _, sub = sel.partition(".")
    if sub and layer in PARTS and sub in PARTS[layer]:
        return name == layer and part == sub
    if sel in ("img", "txt"):
        return kind == "double" and name.startswith(sel + "_")
    if sel in ("double", "single"):
        return kind == sel
    m = _SLICE.match(sel)
    if m:
        return kind == m[1] and int(m[2]) <= idx < int(m[3])
    raise ValueError(f"unknown selector {sel!r}")


def mode_of(rule: str, kind: str, idx: int, name: str, part: str | None = None) -> str:
    """The mode ("none", "w8a8", "w8", "a8", "bf16") that `rule` gives one layer (part); later edits win."""
    base, *edits = rule.split()
    if base not in BASES:
        raise ValueError(f"a rule starts with one of {BASES}, got {base!r}")
    mode = base
    for e in edits:
        if e[0] not in "+-":
            raise ValueError(f"rule edits start with + or -, got {e!r}")
        if selects(e[1:], kind, idx, name, part):
            mode = "w8a8" if e[0] == "+" else "none"
    return mode


def layer_mode(rule: str, kind: str, idx: int, name: str, part: str | None) -> str:
    """`mode_of`, with the exact stream's rule "exact" meaning no rounding anywhere."""
    return "none" if rule == "exact" else mode_of(rule, kind, idx, name, part)


# -------------------------------------------------------------------------------------------------- rounding
def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to rowwise-scaled e4m3 and back (fp32): exactly what the reference fp8 product multiplies."""
    return dequantize_rowwise(*quantize_rowwise(x)).to(x.dtype)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


ACT = {"w8a8": fp8_round, "a8": fp8_round, "bf16": bf16_round}
WEIGHT = {"w8a8": fp8_round, "w8": fp8_round, "bf16": bf16_round}


class Emulated:
    """A block's Linears switchable per stream, each (part of a) product rounded as its mode says.

    linear1 (rows [q|k|v] and [gate|up]) and linear2 (input columns [attn] and [mlp]) can take a different mode per
    part: rows split the output (each part its own GEMM: rowwise weight scales make the fp8 part identical to that
    part of a whole-layer fp8 product); columns split the input, so each part's activations get their own per-token
    scale, as two GEMMs summed would have. Weight variants are rounded once per block and cached.
    """

    def __init__(self, block: nn.Module, hidden: int, mlp_hidden: int):
        self.linears = {n: m for n, m in block.named_modules() if type(m) is nn.Linear}
        self.sizes = {"linear1": (3 * hidden, 2 * mlp_hidden), "linear2": (hidden, mlp_hidden)}
        self.modes: dict[str, tuple[str, ...]] = {}
        self.cache: dict[tuple, torch.Tensor] = {}
        for n, m in self.linears.items():
            m.forward = functools.partial(self.forward, n)

    def set(self, mode_of_part) -> None:
        """mode_of_part(name, part) -> mode, for every Linear (and part) of the block."""
        for n in self.linears:
            self.modes[n] = tuple(mode_of_part(n, p) for p in PARTS.get(n, (None,)))

    def weight(self, n: str, k: int, mode: str) -> torch.Tensor:
        """Part k (or the whole weight, k = -1) of layer n's weight, rounded as `mode` says."""
        key = (n, k, "fp8" if WEIGHT.get(mode) is fp8_round else "bf16" if mode == "bf16" else "exact")
        if key not in self.cache:
            w = self.linears[n].weight
            if k >= 0:
                w = w.split(self.sizes[n], dim=0 if n == "linear1" else 1)[k]
            self.cache[key] = WEIGHT[mode](w) if mode in WEIGHT else w
        return self.cache[key]

    def forward(self, n: str, x: torch.Tensor) -> torch.Tensor:
        modes = self.modes[n]
        if len(set(modes)) == 1:  # one product over the whole layer
            return F.linear(ACT.get(modes[0], _same)(x), self.weight(n, -1, modes[0]))
        if n == "linear1":  # output rows
            return torch.cat([F.linear(ACT.get(md, _same)(x), self.weight(n, k, md)) for k, md in enumerate(modes)], -1)
        xs = x.split(self.sizes[n], dim=-1)  # linear2: input columns
        return sum(F.linear(ACT.get(md, _same)(xk), self.weight(n, k, md)) for k, (xk, md) in enumerate(zip(xs, modes)))


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


# ----------------------------------------------------------------------------------------------- the model
def materialise(module: nn.Module, prefix: str, seed: int, device) -> nn.Module:
    """Fill a meta-built module with the values `random_flux2` gives the tensors of that name, fp32 on `device`."""
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t.copy_(random_tensor(prefix + name, t.shape, device, torch.float32, seed))
    return module.eval().requires_grad_(False)


def stem(cfg, seed: int, device) -> Flux2:
    """Everything but the blocks (embedders, modulations, final layer), with the full model's tensor names."""
    with torch.device("meta"):
        model = Flux2(dataclasses.replace(cfg, depth=0, depth_single_blocks=0))
    return materialise(model, "", seed, device)


def make_inputs(cfg, side: int, n_txt: int, times: list[float], device, seed: int = 1):
    """Drawn on the CPU (the same values on any device), one sample per t."""
    g, b = torch.Generator().manual_seed(seed), len(times)
    x = torch.randn(1, side * side, cfg.in_channels, generator=g).expand(b, -1, -1)
    ctx = torch.randn(1, n_txt, cfg.context_in_dim, generator=g).expand(b, -1, -1)
    vals = (x, grid_ids(side, side)[None], torch.tensor(times), ctx, text_ids(n_txt)[None])
    return tuple(v.to(device) for v in vals)


def rel(a: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Relative L2 error per sample (dim 0)."""
    return ((a - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).tolist()


@torch.no_grad()
def run(cfg, rules: list[str], side: int, n_txt: int, times: list[float], seed: int, device="cpu", log=print) -> dict:
    """Exact fp32 stream plus one stream per rule, block by block; errors against the exact stream."""
    model = stem(cfg, seed, device)
    x, x_ids, t, ctx, ctx_ids = make_inputs(cfg, side, n_txt, times, device)
    guidance = torch.full_like(t, 4.0) if cfg.use_guidance_embed else None  # dev: g = 4
    vec = model.embed_vec(t, guidance, x.dtype)
    pe = rope(torch.cat([ctx_ids, x_ids], dim=1), cfg.axes_dim, cfg.theta)
    mods = model.modulations(vec)
    names = ["exact", *rules]
    state = {r: (model.img_in(x), model.txt_in(ctx)) for r in names}
    depth_err: dict[str, list[float]] = {r: [] for r in rules}
    h, heads, m = cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden

    def walk(kind: str, cls, count: int, streams: dict, forward, joined) -> None:
        """Run every stream through `count` blocks of `kind`, each built once and emulated per rule, recording
        each rule's hidden-state error after every block."""
        for i in range(count):
            t0 = time.perf_counter()
            with torch.device("meta"):
                block = cls(h, heads, m)
            emu = Emulated(materialise(block, f"{kind}_blocks.{i}.", seed, device), h, m)
            for r in names:
                emu.set(functools.partial(layer_mode, r, kind, i))
                streams[r] = forward(block, streams[r])
            ref = joined(streams["exact"])
            for r in rules:
                depth_err[r].append(max(rel(joined(streams[r]), ref)))
            log(f"{kind} {i}: {time.perf_counter() - t0:.1f} s")
            del block, emu
            gc.collect()  # the block and its emulator reference each other: free the GPU memory now

    walk("double", DoubleStreamBlock, cfg.depth, state, lambda b, s: b(*s, pe, mods.img, mods.txt),
         lambda s: torch.cat(s, 1))  # fmt: skip
    n = n_txt
    seq = {r: torch.cat([state[r][1], state[r][0]], 1) for r in names}
    walk("single", SingleStreamBlock, cfg.depth_single_blocks, seq, lambda b, s: b(s, pe, mods.single, n), lambda s: s)
    out = {r: model.final_layer(seq[r][:, n:], vec) for r in names}
    return {r: {"velocity_rel_l2": rel(out[r], out["exact"]), "hidden_rel_l2_by_block": depth_err[r]} for r in rules}


# ------------------------------------------------------------------------------------------ the real layers
REAL = {"fp8": FP8_SKIP, "fp8-all": DEFAULT_SKIP}  # the default layer choice, and every block Linear


@torch.no_grad()
def real_path(cfg, side: int, n_txt: int, times: list[float], seed: int, device, log=print) -> dict:
    """`quantize_transformer` itself (Fp8Linear: scaled_mm on Hopper, else the reference) against the bf16 model
    (`random_flux2`), with and without fast accumulation; plus eager ms per batch-1 step at t = times[0]. The
    copy needs twice the bf16 model's memory (klein 4B / 9B, not dev on one 80 GB card)."""
    model = random_flux2(cfg, device, torch.bfloat16, seed)
    x, x_ids, t, ctx, ctx_ids = make_inputs(cfg, side, n_txt, times, device)
    g = torch.full_like(t, 4.0) if cfg.use_guidance_embed else None
    inp = (x.bfloat16(), x_ids, t, ctx.bfloat16(), ctx_ids)
    ref = model(*inp, guidance=g).float()
    res = {"bf16": {"ms_per_step": _ms(model, inp, g, device)}}
    for (name, skip), fast in itertools.product(REAL.items(), (True, False)):
        quant = quantize_transformer(copy.deepcopy(model), skip, fast_accum=fast)
        key = name + ("" if fast else " exact-accum")
        res[key] = {"velocity_rel_l2": rel(quant(*inp, guidance=g).float(), ref),
                    "ms_per_step": _ms(quant, inp, g, device), "impl": quant.single_blocks[0].linear1.impl}  # fmt: skip
        log(f"{key}: {res[key]}")
        del quant
        gc.collect()
    return res


def _ms(model, inp, g, device, iters: int = 5) -> float:
    """Median eager milliseconds of one batch-1 forward (the first sample of `inp`)."""
    one = [v[:1] if v.shape[0] > 1 else v for v in inp]
    gg = None if g is None else g[:1]
    times = time_steps(lambda: model(*one, guidance=gg), torch.device(device), 2, iters)
    return 1000 * sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------- scaling choices
def _scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale


SCALINGS = {  # x (M, K) -> x rounded to e4m3 with that scale choice, back in fp32
    "rowwise amax (fluxrt)": fp8_round,
    "rowwise 99.9th percentile": lambda t: _scaled(t, t.abs().quantile(0.999, dim=-1, keepdim=True) / E4M3_MAX),
    "rowwise amax, power-of-2 scale": lambda t: _scaled(
        t, 2 ** torch.ceil(torch.log2(t.abs().amax(-1, True) / E4M3_MAX))
    ),
    "1x128 groups along K (no rowwise _scaled_mm)": lambda t: fp8_round(t.unflatten(-1, (-1, 128))).flatten(-2),
}


@torch.no_grad()
def scaling_check(m: int = 1024, k: int = 3072, n: int = 1024, seed: int = 0) -> dict:
    """One W8A8 product's relative L2 error per activation scaling (weights: rowwise amax), on Gaussian activations
    and on SwiGLU outputs silu(a) * b (heavy-tailed, like every MLP output product's input)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    gauss, a, b = (torch.randn(m, k, generator=g) for _ in range(3))
    w8, out = fp8_round(w), {}
    for data, x in (("gaussian", gauss), ("swiglu", F.silu(a) * b)):
        ref = x @ w.t()
        out[data] = {name: ((f(x) @ w8.t() - ref).norm() / ref.norm()).item() for name, f in SCALINGS.items()}
    return out


# ------------------------------------------------------------------------------------------------ FLOPs
def layer_flops(cfg, n_img: int, n_txt: int) -> list[tuple[str, int, str, str | None, float]]:
    """(kind, block index, layer name, part, FLOPs) of every block Linear (part), 2 FLOPs per multiply-add."""
    h, m, rows = cfg.hidden_size, cfg.mlp_hidden, []
    shapes = {"attn.qkv": (h, 3 * h), "attn.proj": (h, h), "mlp.0": (h, 2 * m), "mlp.2": (m, h)}
    for i in range(cfg.depth):
        for stream, tokens in (("img", n_img), ("txt", n_txt)):
            for part, (k, o) in shapes.items():
                name = f"{stream}_{part}"
                rows.append(("double", i, name, None, 2.0 * tokens * k * o))
    n = n_img + n_txt
    for i in range(cfg.depth_single_blocks):
        rows += [
            ("single", i, "linear1", "qkv", 2.0 * n * h * 3 * h),
            ("single", i, "linear1", "mlp", 2.0 * n * h * 2 * m),
        ]
        rows += [("single", i, "linear2", "attn", 2.0 * n * h * h), ("single", i, "linear2", "mlp", 2.0 * n * m * h)]
    return rows


def fp8_flop_share(cfg, rule: str, n_img: int, n_txt: int) -> float:
    """Share of a step's matmul + attention FLOPs that `rule` runs in fp8 (attention and embedders: never)."""
    rows = layer_flops(cfg, n_img, n_txt)
    attn = 4.0 * (n_img + n_txt) ** 2 * cfg.hidden_size * (cfg.depth + cfg.depth_single_blocks)
    total = sum(f for *_, f in rows) + attn
    fp8 = sum(f for kind, i, name, part, f in rows if mode_of(rule, kind, i, name, part) == "w8a8")
    return fp8 / total


# -------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux.2-klein-4b")
    ap.add_argument("--depth", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), help="truncate (default: full)")
    ap.add_argument("--side", type=int, default=8, help="image tokens per side (default 8: 64 image tokens)")
    ap.add_argument("--n-txt", type=int, default=32)
    ap.add_argument("--times", type=float, nargs="+", default=[0.5])
    ap.add_argument("--streams", nargs="*", default=["default"], help="rules, or 'default' for the survey set")
    ap.add_argument("--flops-size", type=int, default=1024, help="image side in pixels for the FLOP shares")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real", action="store_true", help="also measure the real layers against the bf16 model")
    ap.add_argument("--scaling", action="store_true", help="also compare activation scale choices on one product")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    cfg = get_preset(args.model).transformer
    if args.depth:
        cfg = dataclasses.replace(cfg, depth=args.depth[0], depth_single_blocks=args.depth[1])
    rules = list(dict.fromkeys(r for s in args.streams for r in (survey(cfg) if s == "default" else [s])))
    for r in rules:  # parse every rule before the long run
        mode_of(r, "double", 0, "img_attn.qkv")
    t0 = time.perf_counter()
    log = functools.partial(print, flush=True)
    res = run(cfg, rules, args.side, args.n_txt, args.times, args.seed, args.device, log) if rules else {}
    n_img = (args.flops_size // 16) ** 2
    full = get_preset(args.model).transformer  # the shares are those of the full-depth model
    for r in rules:
        res[r]["fp8_flop_share"] = fp8_flop_share(full, r, n_img, 512)
    if rules:
        print(f"\n{args.model} depth {cfg.depth}+{cfg.depth_single_blocks}, {args.side**2} image + {args.n_txt} text "
              f"tokens, t = {args.times}; FLOP share at {args.flops_size}² + 512 text tokens, full depth "
              f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        print(f"{'rule':34} {'velocity rel L2':>22} {'fp8 FLOPs':>9}  hidden rel L2 after block 1, 2, ... (max over t)")
        for r in rules:
            v = ", ".join(f"{e * 100:.2f}%" for e in res[r]["velocity_rel_l2"])
            d = " ".join(f"{e * 100:.1f}" for e in res[r]["hidden_rel_l2_by_block"])
            print(f"{r:34} {v:>22} {res[r]['fp8_flop_share'] * 100:8.1f}%  {d}")
    real = real_path(cfg, args.side, args.n_txt, args.times, args.seed, args.device, log) if args.real else None
    scaling = scaling_check() if args.scaling else None
    for data, row in (scaling or {}).items():
        print(f"one W8A8 product, {data} activations: " + "; ".join(f"{k} {v * 100:.2f}%" for k, v in row.items()))
    write_json(args.out, {"env": environment(torch.device(args.device)), "args": vars(args), "results": res,
                          "real": real, "scaling": scaling})  # fmt: skip


if __name__ == "__main__":
    main()
