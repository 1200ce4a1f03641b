"""Human-readable description of a checkpoint for `fluxrt info` (headers only: instant on any file size).

Contract: `describe(path_or_repo) -> str`, several lines per component: layout and container, detected
variant and matching presets, the config the shapes imply, parameter count, dtypes, size and files.
Raises `CheckpointError` when nothing loadable is found.
"""

from __future__ import annotations

from ..config import AutoEncoderConfig
from .checkpoint import ComponentInfo, inspect_checkpoint


def _config_line(c) -> str:
    if isinstance(c, AutoEncoderConfig):
        return (f"ch {c.ch}, ch_mult {list(c.ch_mult)}, {c.num_res_blocks} res blocks, z {c.z_channels}, "
                f"GroupNorm groups {c.norm_groups}")  # fmt: skip
    return (f"hidden {c.hidden_size}, {c.num_heads} heads of {c.head_dim}, {c.depth} double + "
            f"{c.depth_single_blocks} single blocks, context {c.context_in_dim}, mlp ratio {c.mlp_ratio:g}, "
            f"guidance embedding {'yes' if c.use_guidance_embed else 'no'}")  # fmt: skip


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.2f} {unit})"
    return f"{n:,}"


def _component(ci: ComponentInfo) -> list[str]:
    total = sum(ci.dtypes.values()) or 1
    dtypes = ", ".join(f"{d} {100 * n / total:.1f}%" for d, n in ci.dtypes.items())
    prefix = f" (prefix {ci.prefix!r} stripped)" if ci.prefix else ""
    also = [p for p in ci.presets if p != ci.variant]
    variant = ci.variant + (f" (same shapes: {', '.join(also)})" if also else "")
    if ci.preset and ci.preset != ci.variant:
        variant += f"; picked {ci.preset} by name"
    return [
        f"{ci.component}:",
        f"  variant:    {variant}",
        f"  layout:     {ci.layout}, {ci.key_names} key names{prefix}, {ci.container}",
        f"  config:     {_config_line(ci.config)}",
        f"  parameters: {_count(ci.num_params)} in {ci.num_tensors} tensors",
        f"  dtypes:     {dtypes}",
        f"  size:       {ci.num_bytes / 1e9:.3f} GB in {len(ci.files)} file(s)",
        *(f"  file:       {f}" for f in ci.files),
    ]


def describe(path_or_repo) -> str:
    """Multi-line text describing every component found at `path_or_repo`."""
    info = inspect_checkpoint(path_or_repo)
    lines = [f"source: {info.source}"]
    for ci in info.components.values():
        lines += _component(ci)
    lines.append(f"total: {_count(info.num_params)} parameters, {info.num_bytes / 1e9:.3f} GB")
    return "\n".join(lines)
