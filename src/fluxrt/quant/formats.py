"""One switch for weight quantisation, and fluxrt's own quantized safetensors files.

Contract:
    SCHEMES = ("fp8", "nf4", "int4")
    quantize(model, scheme, skip=None) -> model   in place: every nn.Linear not under a `skip` entry (a prefix
        or a glob pattern; never `lm_head`) becomes Fp8Linear / Nf4Linear / Int4Linear. skip=None takes
        `default_skip(scheme)`: DEFAULT_SKIP (embedders, modulations, final layer) for the 4-bit schemes, and
        fp8.py's FP8_SKIP (which also keeps the MLP products) for fp8. Works on Flux2 and on the transformers
        text encoders (Qwen3, Mistral3: embeddings are nn.Embedding and are left alone). A Linear whose
        in_features does not fit the scheme's block (fp8: 16, nf4: 64, int4: 128, else 64 or 32) stays unquantized.
    quantized_layers(model) -> {name: scheme}
    save_quantized(model, path, scheme, skip=None) -> Path   BFL key names; quantized layers as their buffers:
        fp8:  <layer>.weight float8_e4m3fn (N, K) + <layer>.weight_scale fp32 (N,)         (row scales)
        nf4:  <layer>.weight uint8 (N, K/2) + <layer>.weight_absmax fp32 (N, K/64)          (nf4.py layout)
        int4: <layer>.weight uint8 (N, K/2) + <layer>.weight_scale, <layer>.weight_zero bf16 (N, K/group),
              group 128 (64 or 32 for a layer whose K is not a multiple of 128: read from the shapes)
        metadata: fluxrt_quant = scheme, fluxrt_quant_block = block size ("row" for fp8),
                  fluxrt_quant_skip = JSON list of the skip prefixes, plus save_bfl's config metadata.
    convert(source, out, scheme, device, skip=None) -> Path  load an unquantized checkpoint, quantize, save
All three are weight-only on the storage side; fp8 also quantizes activations per token (see fp8.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import fp8
from .fp8 import DEFAULT_SKIP, Fp8Linear
from .int4 import GROUP, Int4Linear
from .nf4 import BLOCK, Nf4Linear

SCHEMES = ("fp8", "nf4", "int4")
ALWAYS_SKIP = ("lm_head",)  # a language model's output head: never quantized (it is not run by fluxrt anyway)
BLOCKS = {"fp8": 16, "nf4": BLOCK, "int4": GROUP}  # in_features must be a multiple of this
META_SCHEME, META_BLOCK, META_SKIP = "fluxrt_quant", "fluxrt_quant_block", "fluxrt_quant_skip"
_LAYERS = {Fp8Linear: "fp8", Nf4Linear: "nf4", Int4Linear: "int4"}


def default_skip(scheme: str) -> tuple[str, ...]:
    """fp8: fp8.py's own choice (FP8_SKIP, which also keeps the MLP products unquantized, where it exists);
    4-bit: DEFAULT_SKIP (embedders, modulations, final layer), since weight-only error does not compound the same."""
    return tuple(getattr(fp8, "FP8_SKIP", DEFAULT_SKIP)) if scheme == "fp8" else DEFAULT_SKIP


def _skipped(name: str, skip) -> bool:
    """Under a `skip` entry: a module-name prefix ("final_layer") or a glob pattern ("*linear2"), as fp8.py reads them."""
    return fp8.skipped(name, (*skip, *ALWAYS_SKIP))


def _int4_group(k: int) -> int | None:
    """128, or the largest smaller group the tinygemm kernel also takes (64, 32) when K is not a multiple of 128."""
    return next((g for g in (GROUP, 64, 32) if k % g == 0), None)


def _fits(linear: nn.Linear, scheme: str) -> bool:
    if scheme == "fp8":
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0
    if scheme == "int4":
        return _int4_group(linear.in_features) is not None
    return linear.in_features % BLOCKS[scheme] == 0


def _convert_layer(linear: nn.Linear, scheme: str) -> nn.Module:
    if scheme == "fp8":
        return Fp8Linear.from_linear(linear)
    if scheme == "nf4":
        return Nf4Linear.from_linear(linear)
    return Int4Linear.from_linear(linear, _int4_group(linear.in_features))


@torch.no_grad()
def quantize(model: nn.Module, scheme: str, skip=None) -> nn.Module:
    """Replace, in place, the model's nn.Linear layers by `scheme` layers (module docstring); returns the model.
    `skip` None means `default_skip(scheme)`. Each full-precision weight is dropped as soon as its quantized
    copy exists."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    skip = default_skip(scheme) if skip is None else tuple(skip)
    targets = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if _fits(linear, scheme):
            setattr(parent, child, _convert_layer(linear, scheme))
    return model


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """{module name: scheme} of the quantized linears in `model` (fp8, nf4, int4, or gguf:<type>)."""
    from .gguf import GgufLinear, type_name

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, GgufLinear):
            out[n] = f"gguf:{type_name(m.qtype)}"
        elif type(m) in _LAYERS:
            out[n] = _LAYERS[type(m)]
    return out


def metadata(scheme: str, skip) -> dict[str, str]:
    block = "row" if scheme == "fp8" else str(BLOCKS[scheme])
    return {META_SCHEME: scheme, META_BLOCK: block, META_SKIP: json.dumps(list(skip))}


def save_quantized(model: nn.Module, path, scheme: str, skip=None) -> Path:
    """Write a quantized Flux2 (from `quantize`) as one safetensors file with the scheme in its metadata
    (`skip`: what `quantize` was given; None records `default_skip(scheme)`)."""
    from ..loading.save import save_bfl

    skip = default_skip(scheme) if skip is None else tuple(skip)

    found = set(quantized_layers(model).values())
    if found - {scheme}:
        raise ValueError(f"model holds {sorted(found)} layers, not only {scheme!r}")
    return save_bfl(model, path, metadata(scheme, skip))


def convert(source, out, scheme: str, device="cpu", skip=None, dtype=torch.bfloat16) -> Path:
    """Load the transformer at `source` (any layout load_transformer reads) in `dtype`, quantize it on `device`
    with `scheme`, and write `out`. Peak memory: the unquantized model plus one layer."""
    from ..loading.checkpoint import load_transformer

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    model, _ = load_transformer(source, device=device, dtype=dtype)
    if quantized_layers(model):
        raise ValueError(f"{source} is already quantized ({sorted(set(quantized_layers(model).values()))})")
    skip = default_skip(scheme) if skip is None else tuple(skip)
    return save_quantized(quantize(model, scheme, skip), out, scheme, skip)
