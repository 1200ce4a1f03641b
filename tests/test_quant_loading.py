"""Loading quantized transformer files: ours (`fluxrt convert`), diffusers bitsandbytes 4-bit folders, scaled-fp8
single files (BFL fp8r, ComfyUI scaled_fp8) and GGUF files, each made here from tiny random weights and checked
against an independent dequantisation (bitsandbytes / the gguf package / the stored fp8 values and scales).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import TINY_TRANSFORMER, tiny_flux2
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fluxrt import cli
from fluxrt.config import TransformerConfig
from fluxrt.loading import keymaps
from fluxrt.loading.checkpoint import CheckpointError, inspect_checkpoint, load_transformer, save_bfl, save_diffusers
from fluxrt.models.transformer import Flux2
from fluxrt.quant import SCHEMES, Fp8Linear, Int4Linear, Nf4Linear, quantize, quantized_layers, save_quantized
from fluxrt.quant import gguf as G
from fluxrt.quant.nf4 import quantize_nf4
from fluxrt.sampling.latents import grid_ids, text_ids

E4M3 = torch.float8_e4m3fn


def inputs(cfg, side: int = 4, n_txt: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, side * side, cfg.in_channels, generator=g)
    ctx = torch.randn(2, n_txt, cfg.context_in_dim, generator=g)
    guidance = torch.full((2,), 4.0) if cfg.use_guidance_embed else None
    return x, grid_ids(side, side)[None], torch.tensor([0.3, 0.8]), ctx, text_ids(n_txt)[None], guidance


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def run(model):
    return model(*inputs(model.cfg))


def with_weights(cfg, sd: dict) -> Flux2:
    """A plain Flux2 holding exactly `sd` (BFL names): the oracle a dequantized file must equal."""
    model = Flux2(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


# ------------------------------------------------------------------------------------------------ our files
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fluxrt_file_round_trip(tmp_path, scheme):
    cfg = dataclasses.replace(TINY_TRANSFORMER, hidden_size=128, num_heads=4, axes_dim=(8, 8, 8, 8))
    quant = quantize(tiny_flux2(cfg), scheme)
    path = save_quantized(quant, tmp_path / f"tiny-{scheme}.safetensors", scheme)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["fluxrt_quant"] == scheme and json.loads(meta["fluxrt_quant_skip"])[0] == "img_in"
    assert meta["fluxrt_quant_block"] == {"fp8": "row", "nf4": "64", "int4": "128"}[scheme]
    loaded, spec = load_transformer(path)
    assert spec == cfg and quantized_layers(loaded) == quantized_layers(quant)
    assert len(quantized_layers(quant)) == {"fp8": 10, "nf4": 20, "int4": 20}.get(scheme)  # fp8 keeps its MLPs
    a, b = quant.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert torch.equal(run(loaded), run(quant))


def test_fluxrt_file_casts_only_unquantized_tensors(tmp_path):
    path = save_quantized(quantize(tiny_flux2(), "nf4"), tmp_path / "q.safetensors", "nf4")
    model, _ = load_transformer(path, dtype=torch.bfloat16)
    layer = model.double_blocks[0].img_mlp[0]
    assert (
        isinstance(layer, Nf4Linear)
        and layer.weight.dtype == torch.uint8
        and layer.weight_absmax.dtype == torch.float32
    )
    assert model.img_in.weight.dtype == torch.bfloat16
    x, ids, t, ctx, ctx_ids, gd = inputs(model.cfg)
    assert model(x.bfloat16(), ids, t.bfloat16(), ctx.bfloat16(), ctx_ids, gd.bfloat16()).dtype == torch.bfloat16


def test_fluxrt_file_strict_errors_name_the_keys(tmp_path):
    path = save_quantized(quantize(tiny_flux2(), "nf4"), tmp_path / "q.safetensors", "nf4")
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    del sd["double_blocks.1.txt_mlp.2.weight_absmax"]
    sd["single_blocks.0.linear3.weight_absmax"] = torch.ones(4, 1)
    save_file(sd, str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "double_blocks.1.txt_mlp.2.weight" in msg and "single_blocks.0.linear3" in msg and "shape mismatch" in msg


def test_nvfp4_is_refused_by_name(tmp_path):
    sd = {k: v for k, v in tiny_flux2().state_dict().items()}
    sd["single_blocks.0.linear1.weight_scale_2"] = torch.ones(())
    save_file(sd, str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(CheckpointError, match="NVFP4 .*single_blocks.0.linear1.weight_scale_2"):
        load_transformer(tmp_path / "nvfp4.safetensors")


# --------------------------------------------------------------------------------------- bitsandbytes 4-bit
def _bnb_serialise(name: str, w: torch.Tensor, use_bnb: bool) -> tuple[dict, torch.Tensor]:
    """The tensors diffusers writes for one bnb 4-bit weight, and the weight they decode to (the oracle)."""
    if use_bnb:
        import bitsandbytes.functional as F

        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        parts = {f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}
        # bnb's blocks run over the flattened weight; its CPU dequantize of a 2-D state whose rows straddle blocks
        # is wrong in bitsandbytes 0.49-0.50 (errors 3x the NF4 step, seen 2026-11-27), so decode it flat
        flat = copy.copy(state)
        flat.shape = torch.Size([w.numel()])
        return {name: q, **parts}, F.dequantize_4bit(q, flat).reshape(w.shape)
    flat = w.reshape(-1, 64)  # the documented layout by hand: blocks over the flattened weight, no nesting
    packed, absmax = quantize_nf4(flat)
    blob = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(w.shape)})
    from fluxrt.quant.nf4 import NF4_CODE, dequantize_nf4

    code = torch.tensor(NF4_CODE)
    out = {name: packed.reshape(-1, 1), f"{name}.absmax": absmax.reshape(-1), f"{name}.quant_map": code,
           f"{name}.quant_state.bitsandbytes__nf4": torch.tensor(list(blob.encode()), dtype=torch.uint8)}  # fmt: skip
    return out, dequantize_nf4(packed, absmax, code).reshape(w.shape)


@pytest.mark.parametrize("use_bnb", [True, False], ids=["bitsandbytes", "by-hand"])
def test_diffusers_bnb_4bit_folder(tmp_path, use_bnb):
    if use_bnb:
        pytest.importorskip("bitsandbytes")
    model = tiny_flux2()
    folder = save_diffusers(model, tmp_path / "transformer")
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd, file, oracle = load_file(str(weights)), {}, {}
    for k, t in sd.items():  # every Linear, as diffusers' bnb quantizer does (embedders and norm_out included)
        if t.ndim == 2:
            parts, oracle[k] = _bnb_serialise(k, t, use_bnb)
            file.update(parts)
        else:
            file[k] = oracle[k] = t
    save_file(file, str(weights), {"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(cfg))

    assert inspect_checkpoint(folder).components["transformer"].config == TINY_TRANSFORMER  # shapes before packing
    loaded, spec = load_transformer(folder)
    assert spec == TINY_TRANSFORMER
    layers = quantized_layers(loaded)
    assert set(layers.values()) == {"nf4"} and "double_blocks.0.img_attn.qkv" in layers
    assert "final_layer.adaLN_modulation.1" in layers and "time_in.in_layer" in layers
    assert type(loaded.txt_in) is nn.Linear  # K = 32: bnb's 64-blocks straddle rows, dequantized at load
    reference = with_weights(TINY_TRANSFORMER, keymaps.transformer_diffusers_to_bfl(oracle))
    v, v_ref, v_exact = run(loaded), run(reference), run(model)
    assert torch.allclose(v, v_ref, atol=1e-5, rtol=1e-5)  # the same weights as bnb decodes, QKV fused, adaLN swapped
    rel = rel_l2(v, v_exact)
    print(f"bnb-4bit ({'bitsandbytes' if use_bnb else 'by hand'}) tiny velocity rel L2 vs unquantized: {rel:.4f}")
    assert 0.01 < rel < 0.3


# ----------------------------------------------------------------------------------------------- scaled fp8
def _fp8_file(model, style: str) -> tuple[dict, dict]:
    """(file tensors, expected {layer: (e4m3 weight, per-row scale)}) in one of the shipped fp8 styles."""
    out, expect = {}, {}
    for k, t in model.state_dict().items():
        base = k[: -len(".weight")]
        if t.ndim != 2 or not k.startswith(("double_blocks", "single_blocks")):
            out[k] = t.bfloat16()
            continue
        if style == "bfl":  # fp8r: per-row fp32 scales
            scale = t.abs().amax(1).float() / 448
            q = (t / scale[:, None]).to(E4M3)
            out[k], out[base + ".weight_scale"] = q, scale
        elif style == "comfy":  # one scalar per tensor, `scale_weight`, an input scale, and the marker
            scale = t.abs().amax().float() / 448
            q = (t / scale).to(E4M3)
            out[k], out[base + ".scale_weight"], out[base + ".input_scale"] = q, scale.reshape(()), torch.ones(())
            scale = scale.expand(t.shape[0])
        else:  # a plain cast, no scales at all
            q, scale = t.to(E4M3), torch.ones(t.shape[0])
            out[k] = q
        expect[base] = (q, scale)
    if style == "comfy":
        out = {"model.diffusion_model." + k: v for k, v in out.items()}
        out["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=E4M3)
    return out, expect


@pytest.mark.parametrize("style", ["bfl", "comfy", "unscaled"])
def test_scaled_fp8_files(tmp_path, style):
    model = tiny_flux2()
    if style == "unscaled":
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4)  # values inside e4m3's normal range, as a plain cast needs
    file, expect = _fp8_file(model, style)
    save_file(file, str(tmp_path / "fp8.safetensors"))
    loaded, _ = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert set(quantized_layers(loaded)) == set(expect)
    for layer, (q, scale) in expect.items():
        m = loaded.get_submodule(layer)
        assert isinstance(m, Fp8Linear) and torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8))
        assert m.weight_scale.dtype == torch.float32 and torch.allclose(m.weight_scale, scale.float())
    rel = rel_l2(run(loaded), run(model))
    print(f"scaled fp8 ({style}) tiny velocity rel L2 vs unquantized: {rel:.4f}")
    assert 0.001 < rel < 0.1


# ----------------------------------------------------------------------------------------------------- GGUF
GGUF_CFG = TransformerConfig(in_channels=128, context_in_dim=64, hidden_size=256, num_heads=4, depth=1,
                             depth_single_blocks=1, axes_dim=(16, 16, 16, 16), use_guidance_embed=True)  # fmt: skip
GGUF_TYPES = {  # layer -> type, ComfyUI-GGUF style: block types for the big matrices, F16/F32 for the rest
    "double_blocks.0.img_attn.qkv": G.Q8_0, "double_blocks.0.img_attn.proj": G.Q4_K,
    "double_blocks.0.img_mlp.0": G.Q5_K, "double_blocks.0.img_mlp.2": G.Q6_K, "double_blocks.0.txt_attn.qkv": G.Q4_0,
    "double_blocks.0.txt_mlp.0": G.Q5_1, "single_blocks.0.linear1": G.Q6_K, "single_blocks.0.linear2": G.Q4_K,
    "time_in.in_layer": G.Q8_0, "double_blocks.0.txt_mlp.2": "MXFP4",  # no torch dequantiser: numpy at load
    "double_blocks.0.txt_attn.proj": G.BF16,
}  # fmt: skip


def _gguf_file(model, path, prefix=""):
    gguf = pytest.importorskip("gguf")
    tensors, oracle = {}, {}
    for k, t in model.state_dict().items():
        qt = GGUF_TYPES.get(k[: -len(".weight")], G.F32 if t.ndim == 1 else G.F16)
        if qt == "MXFP4":
            qt = int(gguf.GGMLQuantizationType.MXFP4)
            raw = torch.from_numpy(gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType(qt)))
        elif qt in (G.Q4_0, G.Q5_1):
            raw = torch.from_numpy(gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType(qt)))
        elif qt in G.BLOCKS:
            raw = G.quantize_blocks(t, qt)
        else:
            raw = t.to({G.F32: torch.float32, G.F16: torch.float16, G.BF16: torch.bfloat16}[qt])
        tensors[prefix + k] = (qt, raw)
        if raw.dtype == torch.uint8:  # block types: the gguf package's numpy decoder is the oracle
            ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(qt))
            oracle[k] = torch.from_numpy(np.asarray(ref, dtype=np.float32)).reshape(t.shape)
        else:
            oracle[k] = raw.float()
    G.write_gguf(path, tensors)
    return oracle


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bare", "prefixed"])
def test_gguf_file(tmp_path, prefix):
    torch.manual_seed(0)
    model = tiny_flux2(GGUF_CFG)
    oracle = _gguf_file(model, tmp_path / "tiny.gguf", prefix)
    loaded, spec = load_transformer(tmp_path / "tiny.gguf", dtype=torch.float32)
    assert spec == GGUF_CFG
    kept = {k: v for k, v in GGUF_TYPES.items() if v in G.BLOCKS}
    assert quantized_layers(loaded) == {k: f"gguf:{G.type_name(v)}" for k, v in kept.items()}
    assert type(loaded.double_blocks[0].txt_mlp[2]) is nn.Linear  # MXFP4: dequantized once at load
    v, v_ref = run(loaded), run(with_weights(GGUF_CFG, oracle))
    assert torch.allclose(v, v_ref, atol=1e-5, rtol=1e-4)  # every tensor decoded as the gguf package decodes it
    rel = rel_l2(v, run(model))
    print(f"GGUF mixed-type tiny velocity rel L2 vs unquantized: {rel:.4f}")
    assert 0.001 < rel < 0.2
    bf16, _ = load_transformer(tmp_path / "tiny.gguf")  # dtype None: bf16 compute, blocks kept
    assert bf16.img_in.weight.dtype == torch.bfloat16 and bf16.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8


def test_gguf_strict_errors_name_the_keys(tmp_path):
    model = tiny_flux2(GGUF_CFG)
    tensors = {
        k: (G.F32 if t.ndim == 1 else G.F16, t.half() if t.ndim == 2 else t) for k, t in model.state_dict().items()
    }
    del tensors["single_blocks.0.norm.key_norm.scale"]
    tensors["double_blocks.0.img_attn.proj.weight"] = (G.Q8_0, G.quantize_blocks(torch.randn(256, 512), G.Q8_0))
    G.write_gguf(tmp_path / "bad.gguf", tensors)
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path / "bad.gguf")
    assert "single_blocks.0.norm.key_norm.scale" in str(e.value) and "double_blocks.0.img_attn.proj" in str(e.value)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_convert(tmp_path, capsys):
    src = save_bfl(tiny_flux2(dataclasses.replace(TINY_TRANSFORMER, hidden_size=128, axes_dim=(8,) * 4)),
                   tmp_path / "tiny.safetensors")  # fmt: skip
    out = tmp_path / "tiny-int4.safetensors"
    assert cli.main(["convert", str(src), "--quant", "int4", "--out", str(out), "--keep", "single_blocks"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model, _ = load_transformer(out)
    layers = quantized_layers(model)
    assert len(layers) == 16 and all(isinstance(model.get_submodule(n), Int4Linear) for n in layers)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["fluxrt_quant"] == "int4" and "single_blocks" in json.loads(
            f.metadata()["fluxrt_quant_skip"]
        )
    assert cli.main(["convert", str(src), "--quant", "int4", "--out", str(out)]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["convert", str(out), "--quant", "nf4", "--out", str(tmp_path / "again.safetensors")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_converted_embedded_transformer_generates_on_its_own(tmp_path, capsys):
    """`fluxrt convert` writes the transformer alone; generating from that file takes the embedded model's VAE
    and text encoder, and the picture stays close to the unquantized model's."""
    from PIL import Image

    from fluxrt.pipeline import embedded_model_path

    out = tmp_path / "shapes-fp8.safetensors"
    assert cli.main(["convert", str(embedded_model_path() / "flow.safetensors"), "--quant", "fp8", "--out", str(out)]) == 0
    prompt = "a large red circle in the center on a white background"
    for name, model in (("q.png", str(out)), ("ref.png", None)):
        args = ["generate", prompt, "--seed", "0", "--steps", "6", "--size", "128x128", "--out", str(tmp_path / name), "--quiet"]
        assert cli.main(args + (["--model", model] if model else [])) == 0, capsys.readouterr().err
    a, b = (np.asarray(Image.open(tmp_path / n).convert("RGB"), dtype=np.float64) for n in ("q.png", "ref.png"))
    psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))
    assert psnr > 30, psnr
