"""The memory planner: from a model spec and one budget (`--vram 24GB`), where every component lives.

Contract:
    parse_size("24GB") -> 24_000_000_000       GB/MB/KB/TB decimal, GiB/MiB/KiB/TiB binary; errors name the text
    plan_memory(spec, vram, quant=None, *, gpus=1, size=None, dtype=bf16, offload=None, batch=1, prefetch=1,
                schemes=None, text_encoder_quant=None, device="cuda") -> Plan
    Plan.describe() -> str                      the plan in a few lines (the CLI prints it on stderr)

Nothing real is built: the transformer is a Flux2 on the meta device, and a quantized block's bytes are those of
one block of each kind quantized by fluxrt.quant itself on the meta device (so its formats and its default policy
of which layers stay in bf16 are followed); the text encoder comes from a table of the published LMs (truncated
after their deepest used layer); activation workspace from the token count of the requested size. Estimates are
bytes; the benchmark (bench/memory.py) records measured peaks beside them.

Policy, in order (each step takes the first choice that fits the budget minus a reserve):
  1. transformer scheme: the user's `quant`, else the first of [dtype, fp8, 4-bit] that keeps every block
     resident; if none does, 4-bit (the fewest bytes to copy per step), else fp8, with blocks streamed.
  2. text encoder: resident on the GPU (in the compute dtype, then fp8, then 4-bit once the transformer is
     4-bit), on a second GPU, streamed layer by layer per prompt ("stream": nothing stays on the GPU), parked
     on the CPU and moved in whole per prompt ("offload"); with a streamed transformer the option that leaves the
     most blocks resident wins. Running it on the CPU ("cpu") comes last, after streaming the transformer.
  3. streamed transformer: as many blocks resident as fit (spread evenly), prefetch+1 slots for the rest.
The peak is the largest of three phases: encode (text encoder busy), denoise, decode (VAE workspace).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import AutoEncoderConfig, ModelSpec, TextEncoderConfig, TransformerConfig
from ..request import RequestError
from .stream import resident_indices

QUANT_SCHEMES = ("fp8", "nf4", "int4")
FOUR_BIT = ("nf4", "int4")
DEFAULT_FOUR_BIT = "nf4"  # the 4-bit scheme the planner picks on its own: NormalFloat fits Gaussian-like weights
TE_PLACES = ("gpu", "offload", "stream", "cpu", "default")  # plus "cuda:N", a second GPU; "default": no budget
GB = 1e9
LIBRARY_WORKSPACE = 256e6  # cuBLAS / attention workspaces and allocator slack of one phase on a GPU

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes of a size like 24GB, 12GiB, 24000MB or 7.5 GB (decimal GB, binary GiB); ints pass through."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise RequestError(f"memory size {text!r} must be positive")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if not unit:
        raise RequestError(f"invalid memory size {text!r}: use a number and a unit, e.g. 24GB, 12GiB or 24000MB")
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise RequestError(f"memory size {text!r} must be positive")
    return size


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def available_schemes() -> tuple[str, ...]:
    """Schemes this install can apply: fp8 always; nf4/int4 when `fluxrt.quant.quantize` exists."""
    try:
        from .. import quant
    except ImportError:
        return ("fp8",)
    if not hasattr(quant, "quantize"):
        return ("fp8",)
    return tuple(getattr(quant, "SCHEMES", QUANT_SCHEMES))


def check_scheme(scheme: str | None, schemes: tuple[str, ...] | None = None) -> None:
    if scheme is None:
        return
    if scheme not in QUANT_SCHEMES:
        raise RequestError(f"unknown quant scheme {scheme!r}; known: {', '.join(QUANT_SCHEMES)}")
    schemes = available_schemes() if schemes is None else schemes
    if scheme not in schemes:
        raise RequestError(f"quant scheme {scheme!r} needs fluxrt.quant.quantize, which this install lacks "
                           f"(available: {', '.join(schemes)})")  # fmt: skip


# ------------------------------------------------------------------------------------------------ sizes
def four_bit_costs(scheme: str, cuda: bool) -> tuple[float, float]:
    """(bits per weight on the device, bytes per element of the largest layer's weight for the temporaries of
    one product) of fluxrt.quant's 4-bit layers as they run today (the benchmark records measured peaks beside):
    nf4: 4-bit codes + an fp32 absmax per 64 (4.5 bits); bitsandbytes dequantizes the whole weight to bf16
        (2 bytes); without it the product dequantizes row chunks of about 8M weights (~100 MB), under 2 bytes
        per element of any dev layer.
    int4: codes + bf16 scale and zero per 128 (4.25 bits); on CUDA a resident layer keeps only tinygemm's
        repacked copy, a streamed one builds it for the call (half a byte per weight of the layer); elsewhere
        it dequantizes (16 bytes).
    """
    if scheme == "nf4":
        return 4.5, 2.0
    return (4.25, 0.5) if cuda else (4.25, 16.0)


def linear_bytes(n_out: int, n_in: int, scheme: str | None, elt: int, cuda: bool = True) -> float:
    """Bytes of one bias-free Linear weight stored in `scheme` (None: the compute dtype, `elt` bytes each);
    fp8 is one byte per weight plus one fp32 scale per output row."""
    if scheme is None:
        return n_out * n_in * elt
    if scheme == "fp8":
        return n_out * n_in + 4 * n_out
    return n_out * n_in * four_bit_costs(scheme, cuda)[0] / 8


def _module_bytes(module: nn.Module, scheme: str | None, elt: int, cuda: bool = True) -> float:
    """Bytes of a (meta) module once its Linears are in `scheme` by arithmetic (every Linear quantized); other
    tensors stay in the compute dtype."""
    total = 0.0
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if isinstance(m, nn.Linear) and p is m.weight:
                total += linear_bytes(m.out_features, m.in_features, scheme, elt, cuda)
            else:
                total += p.numel() * elt
    return total


def _quantized_block(block: nn.Module, scheme: str | None, elt: int, cuda: bool) -> tuple[float, int]:
    """(bytes, elements of the largest quantized weight) of a meta block quantized by fluxrt.quant itself, on the
    meta device, so the planner follows its formats and which layers its default policy leaves unquantized.
    Falls back to the arithmetic of `linear_bytes` (every Linear quantized) when that cannot run on meta."""
    largest = max((m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear)), default=0)
    if scheme is None:
        return _module_bytes(block, None, elt), largest
    from .apply import quantize_module

    try:
        q = quantize_module(copy.deepcopy(block).to({2: torch.bfloat16, 4: torch.float32}.get(elt, torch.float16)),
                            scheme)  # fmt: skip
    except Exception:  # noqa: BLE001 - a layer without meta support: estimate instead
        return _module_bytes(block, scheme, elt, cuda), largest
    total = float(sum(t.numel() * t.element_size() for t in (*q.parameters(), *q.buffers())))
    quantized = [m for m in q.modules() if not isinstance(m, nn.Linear) and hasattr(m, "in_features")]
    return total, max((m.in_features * m.out_features for m in quantized), default=0)


@functools.lru_cache(maxsize=16)
def _meta_flux2(cfg: TransformerConfig):
    from ..models.transformer import Flux2

    with torch.device("meta"):
        return Flux2(cfg)


@dataclass(frozen=True)
class TransformerSizes:
    """Bytes of a Flux2 in one scheme: everything outside the blocks, and each block in the order it runs."""

    other: float
    blocks: tuple[float, ...]
    max_linear: int  # elements of the largest quantized weight (4-bit layers may dequantize one at a time)

    @property
    def total(self) -> float:
        return self.other + sum(self.blocks)


@functools.lru_cache(maxsize=64)
def transformer_sizes(cfg: TransformerConfig, scheme: str | None, elt: int = 2, cuda: bool = True) -> TransformerSizes:
    model = _meta_flux2(cfg)
    blocks = [*model.double_blocks, *model.single_blocks]
    kinds = {type(b): _quantized_block(b, scheme, elt, cuda) for b in blocks}  # all blocks of a kind are alike
    every = _module_bytes(model, None, elt) - sum(_module_bytes(b, None, elt) for b in blocks)
    return TransformerSizes(every, tuple(kinds[type(b)][0] for b in blocks), max(k[1] for k in kinds.values()))


@dataclass(frozen=True)
class LMShape:
    """What the planner needs of a text encoder's LM (the published configs)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


LM_SHAPES = {
    "mistralai/Mistral-Small-3.2-24B-Instruct-2506": LMShape(5120, 32768, 32, 8, 128, 131072),  # its text model
    "Qwen/Qwen3-8B": LMShape(4096, 12288, 32, 8, 128, 151936),
    "Qwen/Qwen3-4B": LMShape(2560, 9728, 32, 8, 128, 151936),
}


def lm_shape(te: TextEncoderConfig) -> LMShape:
    """The LM behind a text-encoder config: the table, the embedded model's config.json, else a rough guess."""
    if te.repo_id in LM_SHAPES:
        return LM_SHAPES[te.repo_id]
    if te.repo_id == "embedded":
        from ..pipeline import embedded_model_path

        c = json.loads((embedded_model_path() / "text_encoder" / "config.json").read_text())
        return LMShape(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                       c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                       c["vocab_size"])  # fmt: skip
    h = te.hidden_size
    return LMShape(h, 3 * h, max(1, h // 64), max(1, h // 256), min(h, 64), 32000)


@dataclass(frozen=True)
class TextEncoderSizes:
    other: float  # embeddings (never quantized) and norms
    layer: float  # one decoder layer
    layers: int  # kept: max(output_layers)

    @property
    def total(self) -> float:
        return self.other + self.layer * self.layers


def text_encoder_sizes(te: TextEncoderConfig, scheme: str | None, elt: int = 2, cuda: bool = True) -> TextEncoderSizes:
    s = lm_shape(te)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    lin = [(q, s.hidden), (kv, s.hidden), (kv, s.hidden), (s.hidden, q)] + [(s.intermediate, s.hidden)] * 2
    lin += [(s.hidden, s.intermediate)]
    layer = sum(linear_bytes(o, i, scheme, elt, cuda) for o, i in lin) + (2 * s.hidden + 2 * s.head_dim) * elt
    return TextEncoderSizes(s.vocab * s.hidden * elt, layer, max(te.output_layers))


@functools.lru_cache(maxsize=16)
def vae_bytes(cfg: AutoEncoderConfig) -> int:
    from ..models.autoencoder import AutoEncoder

    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    return sum(t.numel() for t in (*ae.parameters(), *ae.buffers())) * 4  # the VAE runs in fp32


# -------------------------------------------------------------------------------------------- workspaces
def denoise_workspace(cfg: TransformerConfig, n_tokens: int, elt: int, scheme: str | None, max_linear: int,
                      cuda: bool = True) -> float:  # fmt: skip
    """Activations of one block at `n_tokens` joint tokens: the widest projection and its neighbours (about
    8H + 4M values per token; bench: dev bf16 at 1024² peaked 1.3 GiB above its weights), plus the temporaries
    of a 4-bit product on the largest weight (`four_bit_costs`), plus library workspace on a GPU."""
    acts = n_tokens * (8 * cfg.hidden_size + 4 * cfg.mlp_hidden) * elt
    dequant = max_linear * four_bit_costs(scheme, cuda)[1] if scheme in FOUR_BIT else 0
    return acts + dequant + LIBRARY_WORKSPACE * cuda


def decode_workspace(cfg: AutoEncoderConfig, width: int, height: int, batch: int, cuda: bool = True) -> float:
    """fp32 VAE decode: about five full-resolution feature maps of the first level's width alive at once."""
    return 5 * 4 * width * height * cfg.ch * cfg.ch_mult[0] * batch + LIBRARY_WORKSPACE * cuda


def encode_workspace(te: TextEncoderConfig, shape: LMShape, elt: int, batch: int, cuda: bool = True) -> float:
    """One LM layer's activations over max_length tokens plus every kept hidden state (output_hidden_states)."""
    t = te.max_length * batch
    return t * (3 * shape.intermediate + (max(te.output_layers) + 6) * shape.hidden) * elt + LIBRARY_WORKSPACE * cuda


# -------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """Where every component lives and in which format; `estimates` are bytes."""

    model: str
    width: int
    height: int
    vram: int | None  # the budget; None: unlimited
    device: str
    quant: str | None  # transformer scheme; None: the compute dtype
    blocks: int
    resident: int  # blocks kept on the device; == blocks: nothing streamed
    prefetch: int
    text_encoder: str  # "gpu", "offload", "stream", "cpu" or "cuda:N"
    text_encoder_quant: str | None
    estimates: dict = field(default_factory=dict, compare=False)

    @property
    def streamed(self) -> bool:
        return self.resident < self.blocks

    @property
    def resident_blocks(self) -> list[int]:
        return resident_indices(self.blocks, self.resident)

    def describe(self) -> str:
        e = self.estimates
        budget = "no memory budget" if self.vram is None else (
            f"within {fmt_bytes(self.vram)} (planning with {fmt_bytes(e['usable'])} after a reserve)")
        if self.streamed:
            blocks = (f"{self.resident}/{self.blocks} blocks resident, {self.blocks - self.resident} streamed from "
                      f"pinned CPU memory ({self.prefetch + 1} slots of {fmt_bytes(e['slot'])}, "
                      f"{fmt_bytes(e['streamed_per_step'])} copied per step)")
        else:
            blocks = f"all {self.blocks} blocks resident"
        te_fmt = self.text_encoder_quant or "compute dtype"
        te = {"gpu": f"resident on {self.device}", "offload": f"on the CPU, moved to {self.device} per prompt",
              "stream": f"layers streamed to {self.device} per prompt", "cpu": "runs on the CPU",
              "default": "placed by --text-encoder-device (default: the same device)"}.get(
            self.text_encoder, f"resident on {self.text_encoder}")  # fmt: skip
        return "\n".join([
            f"memory plan for {self.model} at {self.width}x{self.height} on {self.device}, {budget}:",
            f"  transformer: {self.quant or 'compute dtype'}, {blocks}; {fmt_bytes(e['transformer'])} on device",
            f"  text encoder: {te_fmt}, {te}; {fmt_bytes(e['text_encoder'])} on device while encoding",
            f"  autoencoder: fp32, {fmt_bytes(e['vae'])}",
            (f"  estimated peak {fmt_bytes(e['peak'])} (encode {fmt_bytes(e['encode'])}, denoise "
             f"{fmt_bytes(e['denoise'])}, decode {fmt_bytes(e['decode'])})"),
        ])  # fmt: skip


@dataclass(frozen=True)
class _Inputs:
    spec: ModelSpec
    elt: int
    width: int
    height: int
    batch: int
    gpus: int
    prefetch: int
    cuda: bool


def _footprint(x: _Inputs, scheme, k: int, te_place: str, te_q) -> dict:
    """Bytes of each phase with `k` of the blocks resident and the text encoder at `te_place` in `te_q`."""
    spec, elt = x.spec, x.elt
    ts = transformer_sizes(spec.transformer, scheme, elt, x.cuda)
    n = len(ts.blocks)
    keep = set(resident_indices(n, k))
    streamed = [b for i, b in enumerate(ts.blocks) if i not in keep]
    slot = max(streamed, default=0)
    ring = min(x.prefetch + 1, len(streamed)) * slot
    t_dev = ts.other + sum(ts.blocks[i] for i in keep) + ring
    te = text_encoder_sizes(spec.text_encoder, te_q, elt, x.cuda)
    te_rest = te.total if te_place == "gpu" else 0.0  # on the device between prompts (a stream leaves nothing)
    te_busy = {"gpu": te.total, "offload": te.total, "stream": te.other + 2 * te.layer}.get(te_place, 0.0)
    vae = vae_bytes(spec.autoencoder)
    n_img = (x.width // 16) * (x.height // 16)
    n_tok = (n_img + spec.text_encoder.max_length) * x.batch
    shape = lm_shape(spec.text_encoder)
    enc_ws = encode_workspace(spec.text_encoder, shape, elt, x.batch, x.cuda) if te_busy else 0.0
    den_ws = denoise_workspace(spec.transformer, n_tok, elt, scheme, ts.max_linear, x.cuda)
    phases = {
        "encode": t_dev + te_busy + vae + enc_ws,
        "denoise": t_dev + te_rest + vae + den_ws,
        "decode": t_dev + te_rest + vae + decode_workspace(spec.autoencoder, x.width, x.height, x.batch, x.cuda),
    }
    host = sum(streamed) + (te.total if te_place in ("stream", "offload", "cpu") else 0.0)  # parked in host memory
    return {**phases, "peak": max(phases.values()), "transformer": t_dev, "text_encoder": te_busy, "vae": vae,
            "slot": slot, "streamed_per_step": sum(streamed), "host": host}  # fmt: skip


def _te_options(scheme, gpus: int, te_quant, streamed: bool, cpu: bool) -> list[tuple[str, str | None]]:
    """Text-encoder placements in order of preference: GPU resident (compute dtype, fp8, the transformer's 4-bit),
    a second GPU, stream, offload (never smaller than stream; kept for encoders without layers to stream); the CPU
    only when `cpu` (the last resort: minutes per prompt for dev)."""
    qs = [None, "fp8"] + ([scheme] if scheme in FOUR_BIT else []) if scheme else [None]
    if te_quant is not None:
        qs = [te_quant]
    if cpu:
        return [("cpu", qs[0])]
    second = [(f"cuda:{i}", q) for i in range(1, gpus) for q in qs[:2]]
    gpu = [] if streamed else [("gpu", q) for q in qs]
    return gpu + second + [("stream", q) for q in qs[:2]] + [("offload", q) for q in qs[:1]]


def _te_fits_elsewhere(x: _Inputs, place: str, te_q, usable: float) -> bool:
    """A second GPU holds the whole text encoder (assumed to have the same budget)."""
    if not place.startswith("cuda:"):
        return True
    te = text_encoder_sizes(x.spec.text_encoder, te_q, x.elt, x.cuda)
    ws = encode_workspace(x.spec.text_encoder, lm_shape(x.spec.text_encoder), x.elt, x.batch, x.cuda)
    return te.total + ws <= usable


def reserve_bytes(vram: int) -> float:
    """Kept free: 5% for allocator fragmentation plus up to 512 MiB (CUDA context, cuBLAS handles)."""
    return 0.05 * vram + min(512 * 2**20, 0.05 * vram)


def plan_memory(spec: ModelSpec, vram: int | str | None, quant: str | None = None, *, gpus: int = 1,
                size: tuple[int, int] | None = None, dtype: torch.dtype = torch.bfloat16, offload: str | None = None,
                batch: int = 1, prefetch: int = 1, schemes: tuple[str, ...] | None = None,
                text_encoder_quant: str | None = None, device: str = "cuda") -> Plan:  # fmt: skip
    """Choose formats and placements for `spec` within `vram` bytes (module docstring). Raises RequestError when
    even a fully streamed transformer does not fit, naming the smallest budget that would."""
    schemes = available_schemes() if schemes is None else tuple(schemes)
    check_scheme(quant, schemes)
    check_scheme(text_encoder_quant, schemes)
    if offload not in (None, "stream"):
        raise RequestError(f"unknown offload mode {offload!r}; known: stream")
    vram = None if vram is None else parse_size(vram)
    width, height = size or spec.default_size
    cuda = torch.device(device).type == "cuda"
    x = _Inputs(spec, torch.tensor([], dtype=dtype).element_size(), width, height, batch, gpus, prefetch, cuda)
    n = len(transformer_sizes(spec.transformer, None, x.elt, cuda).blocks)

    def make(scheme, k, te_place, te_q, fp, usable):
        return Plan(spec.name, width, height, vram, str(device), scheme, n, k, prefetch, te_place, te_q,
                    {**fp, "usable": usable})  # fmt: skip

    if vram is None:  # no budget: everything resident (or every block streamed when asked)
        k = 0 if offload == "stream" else n
        fp = _footprint(x, quant, k, "gpu", text_encoder_quant)
        return make(quant, k, "default", text_encoder_quant, fp, None)
    usable = vram - reserve_bytes(vram)
    resident = [quant] if quant else [None] + [s for s in ("fp8", DEFAULT_FOUR_BIT) if s in schemes]
    streamed = [quant] if quant else [s for s in (DEFAULT_FOUR_BIT, "fp8") if s in schemes]
    for cpu in (False, True):  # the text encoder runs on the CPU only when nothing else fits
        if offload != "stream":
            for scheme in resident:
                for place, te_q in _te_options(scheme, gpus, text_encoder_quant, False, cpu):
                    fp = _footprint(x, scheme, n, place, te_q)
                    if fp["peak"] <= usable and _te_fits_elsewhere(x, place, te_q, usable):
                        return make(scheme, n, place, te_q, fp, usable)
        for scheme in streamed:  # 4-bit first: the fewest bytes to copy per step and the most blocks resident
            options = _te_options(scheme, gpus, text_encoder_quant, True, cpu)
            best = _most_resident(x, scheme, n, options, usable)
            if best is not None:
                k, place, te_q, fp = best
                return make(scheme, k, place, te_q, fp, usable)
    need = _footprint(x, streamed[0], 0, "cpu", None)["peak"]
    raise RequestError(f"{spec.name} at {width}x{height} does not fit in {fmt_bytes(vram)}: even streaming "
                       f"every block needs about {fmt_bytes(need + reserve_bytes(vram))}")  # fmt: skip


def _most_resident(x: _Inputs, scheme, n: int, options, usable: float):
    """(k, place, te_q, footprint) of the text-encoder option that leaves the most blocks resident, or None."""
    best = None
    for place, te_q in options:
        if not _te_fits_elsewhere(x, place, te_q, usable):
            continue
        for k in range(n - 1, -1, -1):
            fp = _footprint(x, scheme, k, place, te_q)
            if fp["peak"] <= usable:
                if best is None or k > best[0]:
                    best = (k, place, te_q, fp)
                break
    return best
