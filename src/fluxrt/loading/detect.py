"""Infer configs and the FLUX.2 variant from tensor shapes alone (never from file names).

Contract: every function here takes `{name: shape}` (what a safetensors header holds), so detecting a 64 GB
checkpoint costs nothing. `detect_shapes(shapes)` finds the components (any prefix, BFL or diffusers names),
converts diffusers names to BFL names through the key maps applied to meta tensors, and builds the
`TransformerConfig` / `AutoEncoderConfig` the shapes imply:
    hidden = img_in.weight[0], head_dim = the QK-norm scale length (heads = hidden / head_dim),
    context dim = txt_in.weight[1], depth / depth_single = 1 + the largest block index,
    mlp ratio = rows(img_mlp.0) / 2 / hidden, guidance embedding = any guidance_in.* key;
    VAE: ch = encoder.conv_in rows, ch_mult from each level's first conv, num_res_blocks from level 0,
    z_channels = decoder.post_quant_conv rows.
Shapes cannot tell the RoPE split (axes_dim: head_dim split in 4 equal axes unless given), theta (2000) or
the VAE GroupNorm group count (32 unless given); callers pass those as hints. `matching_presets` lists the
presets with exactly these shapes: klein base / KV share shapes with the distilled models, so several names
may match and the caller picks (see `pick_preset`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..config import PRESETS, AutoEncoderConfig, TransformerConfig
from . import keymaps
from .errors import CheckpointError, listing
from .sources import prefix_of, split_components

Shapes = Mapping[str, Sequence[int]]


def to_bfl_shapes(shapes: Shapes, component: str, key_names: str) -> tuple[dict[str, tuple], list[str]]:
    """BFL-named shapes and the source keys no key-map rule covers (converted on the meta device)."""
    if key_names == "bfl":
        return {k: tuple(s) for k, s in shapes.items()}, []
    meta = {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
    rules = keymaps.TRANSFORMER_RULES if component == "transformer" else keymaps.VAE_RULES
    n_up = keymaps._n_up(meta, r"decoder\.up_blocks\.") if component == "vae" else 0
    out, leftover = keymaps._convert(meta, rules, False, n_up)
    return {k: tuple(t.shape) for k, t in out.items()}, leftover


def _count(shapes: Shapes, prefix: str) -> int:
    """1 + the largest N among keys `prefix + N + .`, or 0."""
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = [int(m.group(1)) for k in shapes for m in [rx.match(k)] if m]
    return max(idx) + 1 if idx else 0


def _shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"cannot infer the {what} config: no {key!r} among {listing(sorted(shapes))}")
    return tuple(shapes[key])


def transformer_config(shapes: Shapes, axes_dim=None, theta: int | None = None) -> TransformerConfig:
    """The TransformerConfig implied by BFL-named shapes (module docstring)."""
    hidden, in_ch = _shape(shapes, "img_in.weight", "transformer")
    ctx = _shape(shapes, "txt_in.weight", "transformer")[1]
    depth, single = _count(shapes, "double_blocks."), _count(shapes, "single_blocks.")
    norm = next((k for k in ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale")
                 if k in shapes), None)  # fmt: skip
    head_dim = shapes[norm][0] if norm else 128
    if depth:
        mlp = shapes["double_blocks.0.img_mlp.0.weight"][0] // 2
    elif single:
        mlp = (shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden) // 2
    else:
        mlp = 3 * hidden
    if hidden % head_dim or head_dim % 4:
        raise CheckpointError(f"hidden size {hidden} and head_dim {head_dim} do not form a FLUX.2 transformer")
    cfg = TransformerConfig(
        in_channels=in_ch, context_in_dim=ctx, hidden_size=hidden, num_heads=hidden // head_dim,
        depth=depth, depth_single_blocks=single, axes_dim=tuple(axes_dim or (head_dim // 4,) * 4),
        theta=theta or 2000, mlp_ratio=mlp / hidden,
        use_guidance_embed=any(k.startswith("guidance_in.") for k in shapes),
    )  # fmt: skip
    if cfg.mlp_hidden != mlp:
        raise CheckpointError(f"MLP width {mlp} is not int(hidden {hidden} * ratio {mlp / hidden})")
    return cfg


def _groups(channels: list[int]) -> int:
    """32 GroupNorm groups when every channel count allows it, else the largest divisor of them all <= 32."""
    g = math.gcd(*channels)
    return max(d for d in range(1, 33) if g % d == 0)


def autoencoder_config(shapes: Shapes, norm_groups: int | None = None) -> AutoEncoderConfig:
    """The AutoEncoderConfig implied by BFL-named (`ae.safetensors`) shapes (module docstring)."""
    ch, in_ch = _shape(shapes, "encoder.conv_in.weight", "VAE")[:2]
    levels = _count(shapes, "encoder.down.")
    chans = [_shape(shapes, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in range(levels)]
    if any(c % ch for c in chans):
        raise CheckpointError(f"VAE level widths {chans} are not multiples of ch {ch}")
    return AutoEncoderConfig(
        in_channels=in_ch, ch=ch, out_ch=_shape(shapes, "decoder.conv_out.weight", "VAE")[0],
        ch_mult=tuple(c // ch for c in chans), num_res_blocks=_count(shapes, "encoder.down.0.block."),
        z_channels=_shape(shapes, "decoder.post_quant_conv.weight", "VAE")[0],
        norm_groups=norm_groups or _groups([ch, *chans]),
    )  # fmt: skip


def matching_presets(cfg: TransformerConfig | AutoEncoderConfig) -> tuple[str, ...]:
    """Names of the presets whose transformer (or autoencoder) config equals `cfg`, registry order."""
    if isinstance(cfg, AutoEncoderConfig):
        return tuple(n for n, s in PRESETS.items() if s.autoencoder == cfg)
    return tuple(n for n, s in PRESETS.items() if s.transformer == cfg)


def variant_name(cfg: TransformerConfig | AutoEncoderConfig) -> str:
    """The shape family: the first matching preset ("flux.2-klein-4b" also covers base-4b), "flux.2-ae", or "custom"."""
    if isinstance(cfg, AutoEncoderConfig) and cfg == AutoEncoderConfig():
        return "flux.2-ae"
    names = matching_presets(cfg)
    return names[0] if names else "custom"


def pick_preset(candidates: Sequence[str], hints: Sequence[str] = ()) -> str | None:
    """The one candidate preset, or the one whose repo id / flow file name equals a hint; else None."""
    if len(candidates) == 1:
        return candidates[0]
    low = {h.lower().rstrip("/") for h in hints}
    named = [n for n in candidates
             if (PRESETS[n].repo_id or "").lower() in low or (PRESETS[n].flow_file or "").lower() in low]  # fmt: skip
    return named[0] if len(named) == 1 else None


@dataclass(frozen=True)
class Detected:
    """One component found in a set of shapes."""

    component: str  # "transformer" | "vae"
    prefix: str  # stripped wrapper prefix, "" for none
    key_names: str  # "bfl" | "diffusers"
    config: TransformerConfig | AutoEncoderConfig
    presets: tuple[str, ...]  # presets with exactly these shapes
    variant: str  # shape family name, or "custom"

    @property
    def layout(self) -> str:
        return "prefixed" if self.prefix else self.key_names


def detect_component(shapes: Shapes, component: str, key_names: str, **hints) -> Detected:
    """Detect from one component's already prefix-stripped shapes; `hints`: axes_dim, theta, norm_groups."""
    bfl, _ = to_bfl_shapes(shapes, component, key_names)
    if component == "transformer":
        cfg = transformer_config(bfl, hints.get("axes_dim"), hints.get("theta"))
    else:
        cfg = autoencoder_config(bfl, hints.get("norm_groups"))
    return Detected(component, "", key_names, cfg, matching_presets(cfg), variant_name(cfg))


def detect_shapes(shapes: Shapes) -> dict[str, Detected]:
    """Every component in `{name: shape}` (full key names, any prefix); {} if nothing is recognised."""
    out = {}
    for comp, (prefix, scheme) in split_components(shapes).items():
        sub = {k[len(prefix) :]: s for k, s in shapes.items() if prefix_of(k) == prefix}
        d = detect_component(sub, comp, scheme)
        out[comp] = Detected(comp, prefix, scheme, d.config, d.presets, d.variant)
    return out
