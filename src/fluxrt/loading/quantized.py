"""Strict loading of quantized transformer checkpoints, recognised from their tensors.

Contract:
    quant_format(src) -> str | None          what a safetensors ComponentSource holds (None: not quantized):
        "fluxrt-fp8" / "fluxrt-nf4" / "fluxrt-int4"  our files (`fluxrt convert`; metadata `fluxrt_quant`)
        "bnb-4bit"     bitsandbytes 4-bit layers as diffusers saves them (`diffusers/FLUX.2-dev-bnb-4bit`):
                       <layer>.weight uint8 (N*K/2, 1) + .weight.absmax, .weight.quant_map, and when double-
                       quantized .weight.nested_absmax, .weight.nested_quant_map, plus the JSON blob
                       .weight.quant_state.bitsandbytes__nf4 (or __fp4) with shape, blocksize, nested_offset
        "scaled-fp8"   float8 weights as BFL (fp8r: weight_scale fp32 (N,)) and ComfyUI (scale_weight or
                       weight_scale scalar, the `scaled_fp8` marker, `comfy_quant` fp8 entries) ship them;
                       a weight with no scale gets scale 1; `input_scale` is ignored (Fp8Linear scales
                       activations per token at run time)
    load_quantized_transformer(src, device, dtype, want) -> (Flux2, spec)
    is_gguf(path) / load_gguf_transformer(path, device, dtype, want) -> (Flux2, spec)
What the returned model holds: fp8 layers -> Fp8Linear with the file's scales; NF4 / FP4 (ours and bnb) ->
Nf4Linear with the file's codes (bnb's double-quantized absmax is expanded to fp32 at load, +0.5 bit per
weight); int4 -> Int4Linear; GGUF Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K -> GgufLinear keeping the blocks; other
GGUF block types (Q2_K, Q3_K, IQ*) and 4-bit layers whose blocks straddle rows are dequantized once at load to
`dtype`. Everything else is cast to `dtype` (None: the file's dtype; for GGUF None means bf16). The model is
built on the meta device, quantized layers are swapped in as empty shells, and the (BFL-named, buffer-level)
names and shapes are checked against it before any tensor is read: a mismatch names the keys.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..models.transformer import Flux2
from ..quant import nf4
from ..quant.formats import META_SCHEME
from ..quant.fp8 import Fp8Linear
from ..quant.int4 import Int4Linear
from . import keymaps
from .errors import CheckpointError, listing
from .sources import ComponentSource, TensorRef, key_scheme, prefix_of

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_IGNORED = ("scaled_fp8",)  # ComfyUI's marker tensor: its dtype names the fp8 format, nothing to load
_IGNORED_SUFFIXES = (".input_scale", ".comfy_quant")
_PARTS = (".weight_absmax", ".weight_scale", ".weight_zero")  # our per-layer quantization buffers
_BLOCK = re.compile(r"^((?:double_blocks|single_blocks|(?:single_)?transformer_blocks)\.\d+)\.")


# ------------------------------------------------------------------------------------------------ detection
def _bnb_layers(names) -> dict[str, str]:
    """{"<layer>.weight": "nf4" | "fp4"} for every serialised bitsandbytes 4-bit weight."""
    out = {}
    for k in names:
        head, sep, qt = k.rpartition(nf4.BNB_STATE)
        if sep and not k.endswith(".weight") and qt in nf4.CODES:
            out[head + ".weight"] = qt
    return out


def quant_format(src: ComponentSource) -> str | None:
    """The quantized layout of `src` (module docstring), or None for an unquantized checkpoint."""
    nvfp4 = sorted(k for k in src.tensors if k.endswith(".weight_scale_2"))
    if nvfp4:
        raise CheckpointError(f"{src.describe_files()}: NVFP4 layers ({listing(nvfp4, 3)}) are not supported yet; "
                              "use the bf16 or fp8 file")  # fmt: skip
    if src.metadata.get(META_SCHEME):
        return f"fluxrt-{src.metadata[META_SCHEME]}"
    if _bnb_layers(src.tensors):
        return "bnb-4bit"
    if any(k.endswith(".weight") and r.dtype in FP8 for k, r in src.tensors.items()):
        return "scaled-fp8"
    return None


# ---------------------------------------------------------------------------------------------------- plan
@dataclass
class Unit:
    """One thing to load: a plain tensor, or one quantized layer and the file keys it is made from."""

    kind: str  # "plain" | "fp8" | "bnb" | "nf4" | "int4"
    key: str  # the plain key, or "<layer>.weight" (source names)
    sources: tuple[str, ...]
    shapes: dict  # normalised source-named {key: shape} this unit yields
    state: dict | None = None  # bnb quant state JSON


def _read_small(src: ComponentSource, keys) -> dict[str, torch.Tensor]:
    out = {}
    with ExitStack() as stack:
        handles = {}
        for k in keys:
            ref = src.tensors[k]
            if ref.file not in handles:
                handles[ref.file] = stack.enter_context(safe_open(str(ref.file), framework="pt"))
            out[k] = handles[ref.file].get_tensor(ref.key)
    return out


def _check_comfy_quant(src: ComponentSource) -> None:
    keys = [k for k in src.tensors if k.endswith(".comfy_quant")]
    for k, t in _read_small(src, keys).items():
        fmt = nf4.bnb_state_json(t).get("format", "?")
        if not str(fmt).startswith("float8"):
            raise CheckpointError(f"{src.describe_files()}: {k} declares {fmt!r}; only float8 layers are supported")


def _bnb_unit(src: ComponentSource, wkey: str, state: dict) -> Unit:
    parts = tuple(f"{wkey}.{p}" for p in nf4.BNB_PARTS if f"{wkey}.{p}" in src.tensors)
    n, k = state["shape"]
    bs = state["blocksize"]
    shapes = ({wkey: (n, k // 2), wkey[: -len("weight")] + "weight_absmax": (n, k // bs)} if k % bs == 0
              else {wkey: (n, k)})  # fmt: skip
    blob = f"{wkey}{nf4.BNB_STATE[len('.weight') :]}{state['quant_type']}"
    return Unit("bnb", wkey, (wkey, *parts, blob), shapes, state)


def plan(src: ComponentSource) -> list[Unit]:
    """Every tensor of `src` assigned to a unit; shapes need only the headers and bnb's small JSON blobs."""
    names = src.tensors
    _check_comfy_quant(src)
    bnb = _bnb_layers(names)
    blobs = {w: f"{w}{nf4.BNB_STATE[len('.weight') :]}{qt}" for w, qt in bnb.items()}
    states = {w: nf4.bnb_state_json(t) for w, t in zip(blobs, _read_small(src, blobs.values()).values())}
    units, used = [], set()
    for w in bnb:
        units.append(_bnb_unit(src, w, states[w]))
    for k, ref in names.items():
        base = k[: -len(".weight")]
        if k in bnb or not k.endswith(".weight"):
            continue
        if base + ".weight_absmax" in names:
            srcs = (k, base + ".weight_absmax")
            units.append(Unit("nf4", k, srcs, {s: names[s].shape for s in srcs}))
        elif base + ".weight_zero" in names:
            srcs = (k, base + ".weight_scale", base + ".weight_zero")
            units.append(Unit("int4", k, srcs, {s: names[s].shape for s in srcs}))
        elif ref.dtype in FP8:
            scale = next((s for s in (base + ".weight_scale", base + ".scale_weight") if s in names), None)
            n = ref.shape[0]
            shapes = {k: ref.shape, base + ".weight_scale": (n,)} if ref.dtype == FP8[0] else {k: ref.shape}
            units.append(Unit("fp8", k, (k, scale) if scale else (k,), shapes))
    for u in units:
        used.update(u.sources)
    ignored = {k for k in names if k in _IGNORED or k.endswith(_IGNORED_SUFFIXES)}
    units += [Unit("plain", k, (k,), {k: names[k].shape}) for k in names if k not in used | ignored]
    return units


# ---------------------------------------------------------------------------------------- names and shapes
def to_bfl(part: dict, key_names: str) -> tuple[dict, list[str]]:
    """Source-named normalised tensors (real or meta) -> BFL names. Quantization buffers go through the same
    key-map rules as their weights (QKV concatenation and the adaLN half swap act on rows), part by part."""
    if key_names == "bfl":
        return part, []
    groups: dict[str, dict] = {}
    for k, v in part.items():
        suf = next((s for s in _PARTS if k.endswith(s)), "")
        groups.setdefault(suf, {})[k[: len(k) - len(suf)] + ".weight" if suf else k] = v
    out, left = {}, []
    for suf, g in groups.items():
        try:
            o, lo = keymaps._convert(g, keymaps.TRANSFORMER_RULES, False)
        except RuntimeError as e:  # e.g. to_q quantized but to_k not: the fused QKV cannot be rebuilt
            raise CheckpointError(f"fused layers mix quantized and unquantized parts among {listing(sorted(g), 6)}: "
                                  f"{e}") from None  # fmt: skip
        out.update({(k[: -len(".weight")] + suf if suf else k): v for k, v in o.items()})
        left += [(k[: -len(".weight")] + suf if suf else k) for k in lo]
    return out, left


def _meta(shapes: dict) -> dict:
    return {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}


def logical_shapes(bfl_shapes: dict) -> dict:
    """Buffer-level BFL shapes -> the weight shapes (N, K) the config is inferred from."""
    out = {k: tuple(s) for k, s in bfl_shapes.items() if not k.endswith(_PARTS)}
    for k in bfl_shapes:
        if k.endswith((".weight_absmax", ".weight_zero")):
            w = k.rpartition(".")[0] + ".weight"
            if w in bfl_shapes:  # an orphan part is left for check_keys to report
                out[w] = (bfl_shapes[w][0], 2 * bfl_shapes[w][1])
    return out


def _shell(kind: str, shapes: dict, layer: str, quant_type: str) -> nn.Module:
    n, k = shapes[layer + ".weight"][0], logical_shapes(shapes)[layer + ".weight"][1]
    if kind == "fp8":
        return Fp8Linear(k, n, device="meta")
    if kind == "nf4":
        return nf4.Nf4Linear(k, n, block=k // shapes[layer + ".weight_absmax"][1], quant_type=quant_type, device="meta")
    return Int4Linear(k, n, group=k // shapes[layer + ".weight_zero"][1], device="meta")


def layer_kinds(bfl_shapes: dict) -> dict[str, str]:
    """{BFL layer name: "fp8" | "nf4" | "int4"} from the normalised buffer names present."""
    kinds = {}
    for k in bfl_shapes:
        layer = k.rpartition(".")[0]
        if layer + ".weight" not in bfl_shapes:
            continue  # an orphan part: check_keys names it
        if k.endswith(".weight_absmax"):
            kinds[layer] = "nf4"
        elif k.endswith(".weight_zero"):
            kinds[layer] = "int4"
        elif k.endswith(".weight_scale") and layer + ".weight_zero" not in bfl_shapes:
            kinds[layer] = "fp8"
    return kinds


def _linear_slot(model: nn.Module, layer: str) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, attribute, the plain nn.Linear) at dotted name `layer`, or None when there is none there (left for
    `check_keys` to report)."""
    parent_name, _, child = layer.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return None
    lin = getattr(parent, child, None)
    return (parent, child, lin) if type(lin) is nn.Linear else None


def build_shells(model: nn.Module, kinds: dict, shapes: dict, quant_type: str = "nf4") -> None:
    """Swap each listed nn.Linear of a meta model for an empty quantized layer; unknown names are left for
    `check_keys` to report."""
    for layer, kind in kinds.items():
        slot = _linear_slot(model, layer)
        if slot is None:
            continue
        parent, child, _ = slot
        try:
            q = _shell(kind, shapes, layer, quant_type)
        except ValueError as e:
            raise CheckpointError(f"{layer}: {e}") from None
        setattr(parent, child, q)


# --------------------------------------------------------------------------------------------- streaming
def _fp8_scale(scale: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if scale is None:
        return torch.ones(n, dtype=torch.float32, device=device)
    scale = scale.float().reshape(-1)
    return scale.expand(n).clone() if scale.numel() == 1 else scale.reshape(n)


def _code(quant_map: torch.Tensor, key: str) -> str:
    for name, values in nf4.CODES.items():
        if quant_map.numel() == 16 and torch.allclose(quant_map.float().cpu(), torch.tensor(values), atol=1e-6):
            return name
    raise CheckpointError(f"{key}: quant_map is neither the NF4 nor the FP4 code of bitsandbytes")


def _normalise(u: Unit, t: dict, dtype) -> dict:
    """Read tensors of one unit -> normalised source-named tensors (see `Unit.shapes`)."""
    cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype) if x.is_floating_point() else x)
    base = u.key[: -len("weight")]
    if u.kind == "plain":  # an fp8 tensor outside a Linear (rare) cannot be computed with: widen it
        return {u.key: t[u.key].to(dtype or torch.bfloat16) if t[u.key].dtype in FP8 else cast(t[u.key])}
    if u.kind in ("nf4", "int4"):
        return {k: t[k] for k in u.sources}
    w = t[u.key]
    if u.kind == "fp8":
        scale = _fp8_scale(t[u.sources[1]] if len(u.sources) > 1 else None, w.shape[0], w.device)
        if w.dtype == FP8[0]:
            return {u.key: w, base + "weight_scale": scale}
        return {u.key: cast(w.float() * scale[:, None])}  # e5m2: dequantized once
    n, k = u.state["shape"]
    bs = u.state["blocksize"]
    absmax = nf4.bnb_absmax({p: t[f"{u.key}.{p}"] for p in nf4.BNB_PARTS if f"{u.key}.{p}" in t}, u.state)
    if k % bs == 0:
        return {u.key: w.reshape(n, k // 2), base + "weight_absmax": absmax.reshape(n, k // bs)}
    code = nf4.code_tensor(u.state["quant_type"], w.device)
    vals = code[nf4.unpack_nibbles(w.reshape(-1))][: n * k] * absmax.repeat_interleave(bs)[: n * k]
    return {u.key: cast(vals.reshape(n, k))}


def _group_of(u: Unit) -> str:
    m = _BLOCK.match(u.key)
    return m.group(1) if m else ""


def stream(src: ComponentSource, units: list[Unit], device, dtype) -> dict:
    """BFL-named, normalised tensors on `device`, one block at a time."""
    dev = str(torch.device(device))
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(_group_of(u), []).append(u)
    out = {}
    with ExitStack() as stack:
        handles = {}
        for members in groups.values():
            part = {}
            for u in members:
                t = {}
                for k in u.sources:
                    ref = src.tensors[k]
                    if ref.file not in handles:
                        handles[ref.file] = stack.enter_context(safe_open(str(ref.file), framework="pt", device=dev))
                    t[k] = handles[ref.file].get_tensor(ref.key)
                part.update(_normalise(u, t, dtype))
            converted, _ = to_bfl(part, src.key_names)
            out.update(converted)
    return out


# -------------------------------------------------------------------------------------------- public API
def _finish(model, shapes, unmapped, src, result, sd_fn):
    from .checkpoint import _load_strict, _what, check_keys

    check_keys(model, shapes, unmapped, src, _what(result))
    _load_strict(model, sd_fn(), src)
    return model.eval(), result


def _spec(src, shapes, want):
    from .checkpoint import _detected_transformer

    result = want if want is not None else _detected_transformer(src, logical_shapes(shapes))
    return result, (result.transformer if hasattr(result, "transformer") else result)


def _bfl_shapes(src: ComponentSource, units: list[Unit]) -> tuple[dict, list[str]]:
    norm = {k: s for u in units for k, s in u.shapes.items()}
    meta_bfl, unmapped = to_bfl(_meta(norm), src.key_names)
    return {k: tuple(t.shape) for k, t in meta_bfl.items()}, unmapped


def logical_bfl_shapes(src: ComponentSource) -> dict:
    """BFL-named weight shapes (N, K) of a quantized source, for config detection and `fluxrt info`."""
    return logical_shapes(_bfl_shapes(src, plan(src))[0])


def load_quantized_transformer(src: ComponentSource, device="cpu", dtype=None, want=None):
    """Load a quantized safetensors transformer (any `quant_format`) strictly; returns (model, spec)."""
    units = plan(src)
    shapes, unmapped = _bfl_shapes(src, units)
    result, cfg = _spec(src, shapes, want)
    qtypes = {u.state["quant_type"] for u in units if u.kind == "bnb"}
    if len(qtypes) > 1:
        raise CheckpointError(f"{src.describe_files()}: mixes bitsandbytes 4-bit codes {sorted(qtypes)}")
    with torch.device("meta"):
        model = Flux2(cfg)
    build_shells(model, layer_kinds(shapes), shapes, quant_type=next(iter(qtypes), "nf4"))
    return _finish(model, shapes, unmapped, src, result, lambda: stream(src, units, device, dtype))


# --------------------------------------------------------------------------------------------------- GGUF
def is_gguf(path_or_repo) -> bool:
    p = Path(str(path_or_repo))
    return p.suffix.lower() == ".gguf"


def load_gguf_transformer(path, device="cpu", dtype=None, want=None):
    """Load a GGUF transformer with BFL key names (ComfyUI-GGUF / unsloth style, any known prefix)."""
    from ..quant import gguf as G

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    tensors, _ = G.read_gguf(path)
    prefixes = {prefix_of(k) for k in tensors if key_scheme([k[len(prefix_of(k)) :]], "transformer")}
    prefix = next(iter(prefixes), "")
    tensors = {k[len(prefix) :]: t for k, t in tensors.items() if prefix_of(k) == prefix}
    if key_scheme(tensors, "transformer") != "bfl":
        raise CheckpointError(f"{path}: not a FLUX.2 transformer with BFL key names (no img_in.weight among "
                              f"{listing(sorted(tensors), 6)})")  # fmt: skip
    kept = {k: t for k, t in tensors.items() if t.qtype in G.BLOCKS and len(t.shape) == 2 and k.endswith(".weight")}
    shapes = {k: ((t.shape[0], t.data.shape[-1]) if k in kept else t.shape) for k, t in tensors.items()}
    refs = {k: TensorRef(path, prefix + k, shapes[k], torch.uint8 if k in kept else torch.float32, 0) for k in tensors}
    src = ComponentSource("transformer", (path,), prefix, "bfl", refs, "file", str(path), {}, {})
    logical = {k: t.shape for k, t in tensors.items()}
    from .checkpoint import _detected_transformer

    result = want if want is not None else _detected_transformer(src, logical)
    cfg = result.transformer if hasattr(result, "transformer") else result
    with torch.device("meta"):
        model = Flux2(cfg)
    layers = {k[: -len(".weight")]: t for k, t in kept.items()}
    _swap_gguf(model, layers)
    dtype = dtype or torch.bfloat16

    def state():
        out = {}
        for k, t in tensors.items():
            if k in kept:
                out[k] = torch.from_numpy(t.data.copy()).to(device)
            else:
                out[k] = G.tensor_values(t).to(device=device, dtype=dtype)
        return out

    return _finish(model, shapes, [], src, result, state)


def _swap_gguf(model: nn.Module, layers: dict) -> None:
    from ..quant.gguf import GgufLinear

    for layer, t in layers.items():
        slot = _linear_slot(model, layer)
        if slot is None or slot[2].in_features != t.shape[1]:
            continue  # left for check_keys to report
        parent, child, _ = slot
        try:
            setattr(parent, child, GgufLinear(t.shape[1], t.shape[0], t.qtype, device="meta"))
        except ValueError as e:
            raise CheckpointError(f"{layer}: {e}") from None
