"""Key maps between the BFL checkpoint layout (our module names) and diffusers' layout, as data.

Each rule maps a BFL key pattern to one or more diffusers key patterns; `{i}` stands for a block index.
Rules with several targets split a fused tensor along dim 0 (QKV); `swap` rules exchange the two halves
(BFL final layer is [shift; scale], diffusers' norm_out is [scale; shift]); `conv1x1` rules squeeze the
VAE attention 1x1 convolutions to diffusers' Linear weights. Both directions are derived from one table.
"""

from __future__ import annotations

import re

import torch

# (bfl, diffusers target(s), transform)
TRANSFORMER_RULES: list[tuple[str, tuple[str, ...], str]] = [
    ("img_in.weight", ("x_embedder.weight",), ""),
    ("txt_in.weight", ("context_embedder.weight",), ""),
    ("time_in.in_layer.weight", ("time_guidance_embed.timestep_embedder.linear_1.weight",), ""),
    ("time_in.out_layer.weight", ("time_guidance_embed.timestep_embedder.linear_2.weight",), ""),
    ("guidance_in.in_layer.weight", ("time_guidance_embed.guidance_embedder.linear_1.weight",), ""),
    ("guidance_in.out_layer.weight", ("time_guidance_embed.guidance_embedder.linear_2.weight",), ""),
    ("double_stream_modulation_img.lin.weight", ("double_stream_modulation_img.linear.weight",), ""),
    ("double_stream_modulation_txt.lin.weight", ("double_stream_modulation_txt.linear.weight",), ""),
    ("single_stream_modulation.lin.weight", ("single_stream_modulation.linear.weight",), ""),
    ("final_layer.linear.weight", ("proj_out.weight",), ""),
    ("final_layer.adaLN_modulation.1.weight", ("norm_out.linear.weight",), "swap"),
    ("double_blocks.{i}.img_attn.qkv.weight",
     tuple(f"transformer_blocks.{{i}}.attn.to_{p}.weight" for p in "qkv"), "split"),
    ("double_blocks.{i}.txt_attn.qkv.weight",
     tuple(f"transformer_blocks.{{i}}.attn.add_{p}_proj.weight" for p in "qkv"), "split"),
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", ("transformer_blocks.{i}.attn.norm_q.weight",), ""),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", ("transformer_blocks.{i}.attn.norm_k.weight",), ""),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", ("transformer_blocks.{i}.attn.norm_added_q.weight",), ""),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", ("transformer_blocks.{i}.attn.norm_added_k.weight",), ""),
    ("double_blocks.{i}.img_attn.proj.weight", ("transformer_blocks.{i}.attn.to_out.0.weight",), ""),
    ("double_blocks.{i}.txt_attn.proj.weight", ("transformer_blocks.{i}.attn.to_add_out.weight",), ""),
    ("double_blocks.{i}.img_mlp.0.weight", ("transformer_blocks.{i}.ff.linear_in.weight",), ""),
    ("double_blocks.{i}.img_mlp.2.weight", ("transformer_blocks.{i}.ff.linear_out.weight",), ""),
    ("double_blocks.{i}.txt_mlp.0.weight", ("transformer_blocks.{i}.ff_context.linear_in.weight",), ""),
    ("double_blocks.{i}.txt_mlp.2.weight", ("transformer_blocks.{i}.ff_context.linear_out.weight",), ""),
    ("single_blocks.{i}.linear1.weight", ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight",), ""),
    ("single_blocks.{i}.linear2.weight", ("single_transformer_blocks.{i}.attn.to_out.weight",), ""),
    ("single_blocks.{i}.norm.query_norm.scale", ("single_transformer_blocks.{i}.attn.norm_q.weight",), ""),
    ("single_blocks.{i}.norm.key_norm.scale", ("single_transformer_blocks.{i}.attn.norm_k.weight",), ""),
]  # fmt: skip


def _vae_rules() -> list[tuple[str, tuple[str, ...], str]]:
    rules = [("bn.running_mean", ("bn.running_mean",), ""), ("bn.running_var", ("bn.running_var",), ""),
             ("bn.num_batches_tracked", ("bn.num_batches_tracked",), ""),
             ("encoder.quant_conv.{p}", ("quant_conv.{p}",), ""),
             ("decoder.post_quant_conv.{p}", ("post_quant_conv.{p}",), "")]  # fmt: skip
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.{{p}}", (f"{part}.conv_in.{{p}}",), ""),
                  (f"{part}.conv_out.{{p}}", (f"{part}.conv_out.{{p}}",), ""),
                  (f"{part}.norm_out.{{p}}", (f"{part}.conv_norm_out.{{p}}",), "")]  # fmt: skip
        for j, name in ((0, "block_1"), (1, "block_2")):
            for r in ("norm1", "conv1", "norm2", "conv2"):
                rules.append((f"{part}.mid.{name}.{r}.{{p}}", (f"{part}.mid_block.resnets.{j}.{r}.{{p}}",), ""))
        a = f"{part}.mid_block.attentions.0"
        rules += [(f"{part}.mid.attn_1.norm.{{p}}", (f"{a}.group_norm.{{p}}",), "")]
        rules += [(f"{part}.mid.attn_1.{s}.{{p}}", (f"{a}.{d}.{{p}}",), "conv1x1")
                  for s, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))]  # fmt: skip
    for r in ("norm1", "conv1", "norm2", "conv2"):
        rules.append(("encoder.down.{i}.block.{j}." + r + ".{p}", ("encoder.down_blocks.{i}.resnets.{j}." + r + ".{p}",), ""))
        rules.append(("decoder.up.{u}.block.{j}." + r + ".{p}", ("decoder.up_blocks.{u}.resnets.{j}." + r + ".{p}",), ""))
    rules += [
        ("encoder.down.{i}.block.{j}.nin_shortcut.{p}", ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}",), ""),
        ("decoder.up.{u}.block.{j}.nin_shortcut.{p}", ("decoder.up_blocks.{u}.resnets.{j}.conv_shortcut.{p}",), ""),
        ("encoder.down.{i}.downsample.conv.{p}", ("encoder.down_blocks.{i}.downsamplers.0.conv.{p}",), ""),
        ("decoder.up.{u}.upsample.conv.{p}", ("decoder.up_blocks.{u}.upsamplers.0.conv.{p}",), ""),
    ]  # fmt: skip
    return rules


VAE_RULES = _vae_rules()


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    rx = rx.replace(r"\{u\}", r"(?P<u>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + "$")


def _convert(sd, rules, forward: bool, n_up: int = 0):
    """Apply `rules` BFL->diffusers (forward) or back; `n_up` = decoder levels (their index is reversed)."""
    out, used = {}, set()
    for bfl, diffusers, how in rules:
        srcs, dsts = ((bfl,), diffusers) if forward else (diffusers, (bfl,))
        groups = _match_groups(sd, [_compile(s) for s in srcs])
        for fields, keys in groups.items():
            f = dict(fields)
            if "u" in f:  # decoder.up.{b} <-> decoder.up_blocks.{n_up-1-b}
                f["u"] = str(n_up - 1 - int(f["u"]))
            tensors = [sd[k] for k in keys]
            used.update(keys)
            for name, t in zip(dsts, _transform(tensors, how, forward, len(dsts))):
                out[name.format(**f)] = t
    leftover = sorted(set(sd) - used)
    return out, leftover


def _match_groups(sd, rxs: list[re.Pattern]) -> dict:
    """Keys of sd matching every pattern in rxs with the same placeholders -> {fields: [key per pattern]}."""
    found: dict[tuple, list] = {}
    for pos, rx in enumerate(rxs):
        for k in sd:
            m = rx.match(k)
            if m:
                found.setdefault(tuple(sorted(m.groupdict().items())), [None] * len(rxs))[pos] = k
    return {f: ks for f, ks in found.items() if None not in ks}


def _transform(tensors: list[torch.Tensor], how: str, forward: bool, n_out: int) -> list[torch.Tensor]:
    if how == "split":
        return list(tensors[0].chunk(n_out, dim=0)) if forward else [torch.cat(tensors, dim=0)]
    if how == "swap":
        a, b = tensors[0].chunk(2, dim=0)
        return [torch.cat([b, a], dim=0)]
    if how == "conv1x1" and tensors[0].ndim == (4 if forward else 2):
        t = tensors[0]
        return [t[:, :, 0, 0] if forward else t[:, :, None, None]]
    return tensors


def _checked(out, leftover, what):
    if leftover:
        raise KeyError(f"{what}: no mapping for {len(leftover)} keys: {', '.join(leftover[:8])}")
    return out


def transformer_bfl_to_diffusers(sd: dict) -> dict:
    return _checked(*_convert(sd, TRANSFORMER_RULES, True), "transformer BFL -> diffusers")


def transformer_diffusers_to_bfl(sd: dict) -> dict:
    return _checked(*_convert(sd, TRANSFORMER_RULES, False), "transformer diffusers -> BFL")


def _n_up(sd: dict, prefix: str) -> int:
    idx = [int(m.group(1)) for k in sd for m in [re.match(prefix + r"(\d+)\.", k)] if m]
    return max(idx) + 1 if idx else 0


def vae_bfl_to_diffusers(sd: dict) -> dict:
    return _checked(*_convert(sd, VAE_RULES, True, _n_up(sd, r"decoder\.up\.")), "VAE BFL -> diffusers")


def vae_diffusers_to_bfl(sd: dict) -> dict:
    return _checked(*_convert(sd, VAE_RULES, False, _n_up(sd, r"decoder\.up_blocks\.")), "VAE diffusers -> BFL")
