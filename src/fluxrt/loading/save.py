"""Writers: BFL single files and diffusers folders, for tests and for converting checkpoints.

Contract:
    save_bfl(model, path)                      one safetensors file with our (official BFL) key names; the
                                               fluxrt config goes in the header metadata so tiny models
                                               round-trip exactly (GroupNorm groups, RoPE split)
    save_diffusers(model, folder, shard_bytes) a diffusers component folder: config.json + weights, sharded
                                               with `diffusion_pytorch_model.safetensors.index.json` when
                                               the tensors exceed `shard_bytes`
    save_diffusers_pipeline(folder, transformer=, vae=)  model_index.json + transformer/ + vae/
`model` is a `Flux2` or an `AutoEncoder`; tensors are copied to CPU as they are written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import save_file

from ..models.autoencoder import AutoEncoder
from ..models.transformer import Flux2
from . import keymaps

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose config format these folders follow
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _component(model) -> str:
    if isinstance(model, Flux2):
        return "transformer"
    if isinstance(model, AutoEncoder):
        return "vae"
    raise TypeError(f"expected a Flux2 or AutoEncoder, got {type(model).__name__}")


def _cpu(sd: dict) -> dict:
    """Detached, contiguous CPU tensors that own their storage (safetensors refuses shared memory)."""
    out = {}
    for k, t in sd.items():
        t = t.detach().to("cpu")
        out[k] = t.clone() if t._base is not None or not t.is_contiguous() else t
    return out


def save_bfl(model, path, metadata: dict | None = None) -> Path:
    """Write `model`'s state dict under its BFL names to one safetensors file."""
    comp = _component(model)
    meta = {"format": "pt", "fluxrt.component": comp, "fluxrt.config": json.dumps(dataclasses.asdict(model.cfg))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(model.state_dict()), str(path), {**meta, **(metadata or {})})
    return path


def diffusers_config(model) -> dict:
    """The config.json diffusers 0.42.1 would write for the equivalent Flux2Transformer2DModel / AutoencoderKLFlux2."""
    c = model.cfg
    if _component(model) == "transformer":
        return {
            "_class_name": "Flux2Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION, "patch_size": 1,
            "in_channels": c.in_channels, "out_channels": None, "num_layers": c.depth,
            "num_single_layers": c.depth_single_blocks, "attention_head_dim": c.head_dim,
            "num_attention_heads": c.num_heads, "joint_attention_dim": c.context_in_dim,
            "timestep_guidance_channels": 256, "mlp_ratio": c.mlp_ratio, "axes_dims_rope": list(c.axes_dim),
            "rope_theta": c.theta, "eps": 1e-6, "guidance_embeds": c.use_guidance_embed,
        }  # fmt: skip
    n = len(c.ch_mult)
    return {
        "_class_name": "AutoencoderKLFlux2", "_diffusers_version": DIFFUSERS_VERSION, "in_channels": c.in_channels,
        "out_channels": c.out_ch, "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": [c.ch * m for m in c.ch_mult],
        "decoder_block_out_channels": None, "layers_per_block": c.num_res_blocks, "act_fn": "silu",
        "latent_channels": c.z_channels, "norm_num_groups": c.norm_groups, "sample_size": 1024,
        "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
        "batch_norm_eps": c.bn_eps, "batch_norm_momentum": 0.1, "patch_size": [2, 2],
    }  # fmt: skip


def _shards(sd: dict, shard_bytes: int | None) -> list[dict]:
    """Greedy split in key order; every shard holds at least one tensor."""
    if not shard_bytes:
        return [sd]
    shards, cur, size = [], {}, 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + n
    return shards + [cur] if cur else shards


def _write_weights(sd: dict, folder: Path, shard_bytes: int | None) -> None:
    shards = _shards(sd, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), {"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / (WEIGHTS + ".index.json")).write_text(json.dumps(index, indent=2))


def save_diffusers(model, folder, shard_bytes: int | None = None) -> Path:
    """Write a diffusers component folder (config.json + weights under diffusers names) for `model`."""
    comp = _component(model)
    convert = keymaps.transformer_bfl_to_diffusers if comp == "transformer" else keymaps.vae_bfl_to_diffusers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(diffusers_config(model), indent=2))
    _write_weights(_cpu(convert(dict(model.state_dict()))), folder, shard_bytes)
    return folder


def save_diffusers_pipeline(folder, transformer=None, vae=None, shard_bytes: int | None = None) -> Path:
    """Write model_index.json plus transformer/ and vae/ folders (text encoder and scheduler not included)."""
    folder = Path(folder)
    klein = transformer is not None and not transformer.cfg.use_guidance_embed
    index = {"_class_name": "Flux2KleinPipeline" if klein else "Flux2Pipeline", "_diffusers_version": DIFFUSERS_VERSION}
    for name, model, cls in (("transformer", transformer, "Flux2Transformer2DModel"),
                             ("vae", vae, "AutoencoderKLFlux2")):  # fmt: skip
        if model is not None:
            save_diffusers(model, folder / name, shard_bytes)
            index[name] = ["diffusers", cls]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
