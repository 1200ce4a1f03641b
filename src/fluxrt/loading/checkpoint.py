"""Strict, direct-to-device loading of the FLUX.2 flow transformer and VAE, and checkpoint inspection.

Contract:
    load_transformer(path_or_repo, device="cpu", dtype=None, spec=None) -> (Flux2, ModelSpec | TransformerConfig)
    load_autoencoder(path_or_repo, device="cpu", dtype=torch.float32, config=None) -> AutoEncoder
    inspect_checkpoint(path_or_repo) -> CheckpointInfo
Quantized checkpoints (fluxrt `convert` files, diffusers bitsandbytes 4-bit, scaled fp8, `.gguf`) are recognised
from their tensors and loaded by `loading/quantized.py` under the same strictness.
`path_or_repo` is anything `sources.find_component` accepts (BFL file, prefixed / all-in-one file, diffusers
pipeline or component folder, sharded or not, or an `org/name` repo id in the local hub cache).
The model is built on the meta device; each tensor is read from its file straight to `device`, cast to
`dtype` (None keeps the file's dtype; only floating tensors are cast; the VAE's BatchNorm statistics stay
fp32), converted from diffusers names per block when needed (so the state dict never exists twice), and
loaded with `load_state_dict(strict=True, assign=True)`. Before any tensor is read, the names and shapes are
checked against the model: any missing, unexpected or mis-shaped key raises `CheckpointError` naming the
file(s) and the keys. With no `spec`, the config comes from the shapes (`detect`); it is returned as the
preset `ModelSpec` when exactly one preset fits (shape-equal siblings such as klein / klein-base are told
apart only by a repo id or official file name), else as the bare `TransformerConfig`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import PRESETS, AutoEncoderConfig, ModelSpec, TransformerConfig, get_preset
from ..models.autoencoder import AutoEncoder
from ..models.transformer import Flux2
from . import keymaps
from .detect import autoencoder_config, matching_presets, pick_preset, to_bfl_shapes, transformer_config, variant_name
from .errors import CheckpointError, listing
from .save import save_bfl, save_diffusers, save_diffusers_pipeline  # re-exported writers
from .sources import ComponentSource, find_component, find_components

__all__ = [
    "CheckpointError", "CheckpointInfo", "ComponentInfo", "inspect_checkpoint", "load_autoencoder",
    "load_transformer", "save_bfl", "save_diffusers", "save_diffusers_pipeline",
]  # fmt: skip

_QUANT_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".comfy_quant", ".scale_weight")
_FP32_KEYS = ("bn.running_mean", "bn.running_var")  # latent statistics: kept fp32 whatever `dtype` is
_BLOCK = re.compile(r"^((?:single_)?transformer_blocks\.\d+)\.")


# ----------------------------------------------------------------------------------------------- hints / config
def _fluxrt_config(src: ComponentSource) -> dict:
    """The config a fluxrt writer stored in the safetensors metadata, if any."""
    if src.metadata.get("fluxrt.component") != src.component:
        return {}
    try:
        return json.loads(src.metadata.get("fluxrt.config", "{}"))
    except json.JSONDecodeError:
        return {}


def _hints(src: ComponentSource) -> dict:
    """Values shapes cannot tell (RoPE split, theta, GroupNorm groups) from fluxrt metadata or config.json."""
    ours, cj = _fluxrt_config(src), src.config_json
    if src.component == "transformer":
        axes = ours.get("axes_dim") or cj.get("axes_dims_rope")
        return {"axes_dim": tuple(axes) if axes else None, "theta": ours.get("theta") or cj.get("rope_theta")}
    return {"norm_groups": ours.get("norm_groups") or cj.get("norm_num_groups")}


def _as_transformer_spec(spec) -> ModelSpec | TransformerConfig | None:
    if isinstance(spec, str):
        return get_preset(spec)
    if spec is None or isinstance(spec, (ModelSpec, TransformerConfig)):
        return spec
    raise TypeError(f"spec must be a preset name, ModelSpec or TransformerConfig, not {type(spec).__name__}")


def _detected_transformer(src: ComponentSource, shapes: dict) -> ModelSpec | TransformerConfig:
    try:
        cfg = transformer_config(shapes, **_hints(src))
    except CheckpointError as e:
        raise CheckpointError(f"{src.describe_files()}: {e}") from None
    name = pick_preset(matching_presets(cfg), src.hints())
    return PRESETS[name] if name else cfg


# --------------------------------------------------------------------------------------------------- checking
def _what(spec) -> str:
    """A short name for the model a checkpoint is checked against."""
    if isinstance(spec, ModelSpec):
        return f"preset {spec.name}"
    if isinstance(spec, AutoEncoderConfig):
        return f"{variant_name(spec)} AutoEncoderConfig"
    names = matching_presets(spec)
    return f"{'preset ' + names[0] if names else 'custom'} {type(spec).__name__}"


def _refuse_quantized(src: ComponentSource) -> None:
    quant = sorted(k for k in src.tensors if k.endswith(_QUANT_SUFFIXES))
    if quant:
        raise CheckpointError(
            f"{src.describe_files()}: a quantized checkpoint (scale tensors such as {listing(quant, 3)}); "
            "this loader reads unquantized weights only"
        )


def check_keys(model: torch.nn.Module, shapes: dict, unmapped: list[str], src: ComponentSource, what: str) -> None:
    """Raise CheckpointError unless `shapes` (BFL names) are exactly the model's state-dict names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(shapes) - optional)
    unexpected = sorted(set(shapes) - set(expected)) + sorted(unmapped)
    wrong = [f"{k}: file {list(shapes[k])} vs model {list(expected[k])}"
             for k in sorted(set(shapes) & set(expected)) if tuple(shapes[k]) != expected[k]]  # fmt: skip
    if missing or unexpected or wrong:
        head = (f"{src.describe_files()}: {src.component} ({src.layout} layout, names compared in BFL form) "
                f"does not match the model ({what}): {len(missing)} missing, {len(unexpected)} unexpected, "
                f"{len(wrong)} shape mismatches")  # fmt: skip
        lines = [head]
        lines += [f"  missing: {listing(missing)}"] if missing else []
        lines += [f"  unexpected: {listing(unexpected)}"] if unexpected else []
        lines += [f"  shape mismatch: {listing(wrong, 6)}"] if wrong else []
        raise CheckpointError("\n".join(lines))


# -------------------------------------------------------------------------------------------------- streaming
def _groups(src: ComponentSource) -> list[list[str]]:
    """Names read and converted together: one block at a time for diffusers transformers, else all at once."""
    if src.key_names == "bfl":
        return [[name] for name in sorted(src.tensors)]  # no conversion: one tensor at a time
    if src.component == "vae":
        return [sorted(src.tensors)]  # a small model whose up-block order needs all keys
    groups: dict[str, list[str]] = {}
    for name in sorted(src.tensors):
        m = _BLOCK.match(name)
        groups.setdefault(m.group(1) if m else "", []).append(name)
    return list(groups.values())


def _to_bfl(part: dict, src: ComponentSource) -> dict:
    if src.key_names == "bfl":
        return part
    if src.component == "transformer":
        return keymaps.transformer_diffusers_to_bfl(part)
    return keymaps.vae_diffusers_to_bfl(part)


def stream_state_dict(src: ComponentSource, device, dtype_for: Callable[[str, torch.dtype], torch.dtype],
                      place: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict:  # fmt: skip
    """BFL-named tensors on `device`, read tensor by tensor from the files and cast by `dtype_for(name, dtype)`.
    With `place`, tensors are read on the CPU and each BFL-named tensor becomes `place(name, tensor)` (a rank's
    shard, say) before it is cast and moved to `device`."""
    dev = "cpu" if place is not None else str(torch.device(device))
    out = {}
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for names in _groups(src):
            part = {}
            for name in names:
                ref = src.tensors[name]
                if ref.file not in handles:
                    handles[ref.file] = stack.enter_context(safe_open(str(ref.file), framework="pt", device=dev))
                t = handles[ref.file].get_tensor(ref.key)
                part[name] = t if place is not None else t.to(dtype_for(name, t.dtype))
            for name, t in _to_bfl(part, src).items():
                out[name] = t if place is None else place(name, t).to(device, dtype_for(name, t.dtype))
            del part
    return out


def _load_strict(model: torch.nn.Module, sd: dict, src: ComponentSource) -> None:
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{src.describe_files()}: {e}") from None
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{src.describe_files()}: tensors left unloaded on the meta device: {listing(left)}")


def _cast_rule(dtype: torch.dtype | None, keep_fp32=()) -> Callable[[str, torch.dtype], torch.dtype]:
    def rule(name: str, file_dtype: torch.dtype) -> torch.dtype:
        if not file_dtype.is_floating_point:
            return file_dtype
        if name in keep_fp32:
            return torch.float32
        return file_dtype if dtype is None else dtype

    return rule


# ------------------------------------------------------------------------------------------------ public API
def load_transformer(path_or_repo, device="cpu", dtype: torch.dtype | None = None, spec=None, split=None):
    """Load the flow transformer strictly; returns (model in eval mode, ModelSpec or TransformerConfig).

    split(model) -> place: restructures the model (tensor parallelism: `fluxrt.parallel.tp.sharded_loading`) and
    returns `place(name, full tensor) -> the tensor the new model holds`. It is called on the meta model after the
    key check, so only the places reach `device`; quantized files are loaded whole and then split."""
    from . import quantized  # quantized files (fluxrt, bnb 4-bit, scaled fp8, GGUF): loading/quantized.py

    want = _as_transformer_spec(spec)
    if quantized.is_gguf(path_or_repo):
        return _split_built(quantized.load_gguf_transformer(path_or_repo, device, dtype, want), split)
    src = find_component(path_or_repo, "transformer", want.flow_file if isinstance(want, ModelSpec) else None)
    if quantized.quant_format(src):
        return _split_built(quantized.load_quantized_transformer(src, device, dtype, want), split)
    _refuse_quantized(src)
    shapes, unmapped = to_bfl_shapes(src.shapes, "transformer", src.key_names)
    result = want if want is not None else _detected_transformer(src, shapes)
    cfg = result.transformer if isinstance(result, ModelSpec) else result
    with torch.device("meta"):
        model = Flux2(cfg)
    check_keys(model, shapes, unmapped, src, _what(result))
    place = split(model) if split is not None else None
    _load_strict(model, stream_state_dict(src, device, _cast_rule(dtype), place), src)
    return model.eval(), result


def _split_built(loaded: tuple, split) -> tuple:
    """(model, spec) with `split` applied to the built model (its weights sliced in place)."""
    if split is not None:
        split(loaded[0])
    return loaded


def load_autoencoder(path_or_repo, device="cpu", dtype: torch.dtype | None = torch.float32, config=None):
    """Load the VAE strictly (fp32 by default; BatchNorm statistics always fp32) and return it in eval mode."""
    if isinstance(config, (str, ModelSpec)):
        config = (get_preset(config) if isinstance(config, str) else config).autoencoder
    src = find_component(path_or_repo, "vae")
    _refuse_quantized(src)
    shapes, unmapped = to_bfl_shapes(src.shapes, "vae", src.key_names)
    if config is None:
        try:
            config = autoencoder_config(shapes, **_hints(src))
        except CheckpointError as e:
            raise CheckpointError(f"{src.describe_files()}: {e}") from None
    with torch.device("meta"):
        model = AutoEncoder(config)
    check_keys(model, shapes, unmapped, src, _what(config))
    sd = stream_state_dict(src, device, _cast_rule(dtype, _FP32_KEYS))
    sd.setdefault("bn.num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
    _load_strict(model, sd, src)
    return model.eval()


@dataclass(frozen=True)
class ComponentInfo:
    """What one component of a checkpoint is, from its headers only."""

    component: str  # "transformer" | "vae"
    layout: str  # "bfl" | "diffusers" | "prefixed"
    key_names: str  # "bfl" | "diffusers"
    prefix: str
    container: str  # "file" | "diffusers" | "component-folder" | "folder"
    files: tuple[Path, ...]
    config: TransformerConfig | AutoEncoderConfig
    variant: str  # shape family ("flux.2-dev", "flux.2-klein-4b", "flux.2-ae", "custom")
    presets: tuple[str, ...]  # every preset with these shapes
    preset: str | None  # the one preset picked (shapes + repo id / file name), if unambiguous
    num_params: int  # values in floating-point tensors (BatchNorm statistics included)
    num_tensors: int
    num_bytes: int
    dtypes: dict[str, int]  # dtype name -> number of values


@dataclass(frozen=True)
class CheckpointInfo:
    source: str
    components: dict[str, ComponentInfo]

    def _main(self) -> ComponentInfo:
        return self.components.get("transformer") or next(iter(self.components.values()))

    @property
    def layout(self) -> str:
        return self._main().layout

    @property
    def variant(self) -> str:
        return self._main().variant

    @property
    def num_params(self) -> int:
        return sum(c.num_params for c in self.components.values())

    @property
    def num_bytes(self) -> int:
        return sum(c.num_bytes for c in self.components.values())

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(f for c in self.components.values() for f in c.files))


def _component_info(src: ComponentSource) -> ComponentInfo:
    from . import quantized

    if src.component == "transformer" and quantized.quant_format(src):
        shapes = quantized.logical_bfl_shapes(src)  # weight shapes before packing (bnb stores (N*K/2, 1))
    else:
        shapes, _ = to_bfl_shapes(src.shapes, src.component, src.key_names)
    try:
        if src.component == "transformer":
            cfg = transformer_config(shapes, **_hints(src))
        else:
            cfg = autoencoder_config(shapes, **_hints(src))
    except CheckpointError as e:
        raise CheckpointError(f"{src.describe_files()}: {e}") from None
    presets = matching_presets(cfg)
    dtypes: Counter = Counter()
    for ref in src.tensors.values():
        dtypes[str(ref.dtype).removeprefix("torch.")] += _numel(ref.shape)
    params = sum(_numel(r.shape) for r in src.tensors.values() if r.dtype.is_floating_point)
    return ComponentInfo(
        src.component, src.layout, src.key_names, src.prefix, src.container, src.files, cfg, variant_name(cfg),
        presets, pick_preset(presets, src.hints()) if src.component == "transformer" else None, params,
        len(src.tensors), sum(r.nbytes for r in src.tensors.values()), dict(dtypes.most_common()),
    )  # fmt: skip


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def inspect_checkpoint(path_or_repo) -> CheckpointInfo:
    """Describe every component (transformer, VAE) at `path_or_repo` from the safetensors headers."""
    return CheckpointInfo(str(path_or_repo), {c: _component_info(s) for c, s in find_components(path_or_repo).items()})
