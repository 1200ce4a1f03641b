"""Parity with diffusers==0.42.1 on tiny random weights: transformer (plain and klein-KV) and VAE.

Our BFL-layout weights go through our key maps and load strictly into diffusers' classes; outputs must agree
within 1e-5 in fp32 (the measured differences are around 1e-7) and loosely in bf16. The VAE oracle does the
pipeline's patchify and BatchNorm normalisation by hand, written from the spec, not with our helpers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_AE, TINY_TRANSFORMER, tiny_autoencoder, tiny_flux2

from fluxrt.loading.checkpoint import load_autoencoder, load_transformer, save_bfl, save_diffusers
from fluxrt.loading.keymaps import transformer_bfl_to_diffusers, vae_bfl_to_diffusers
from fluxrt.loading.save import diffusers_config

diffusers = pytest.importorskip("diffusers", reason="parity tests need the 'parity' extra (diffusers==0.42.1)")
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
)

pytestmark = pytest.mark.parity
FP32_TOL = 1e-5
KLEIN_TINY = dataclasses.replace(TINY_TRANSFORMER, use_guidance_embed=False)


def _kwargs(model) -> dict:
    return {k: v for k, v in diffusers_config(model).items() if not k.startswith("_")}


def diffusers_transformer(model) -> Flux2Transformer2DModel:
    """diffusers' model with our weights, converted by our key map and loaded strictly."""
    ref = Flux2Transformer2DModel(**_kwargs(model))
    ref.load_state_dict(transformer_bfl_to_diffusers(dict(model.state_dict())), strict=True)
    return ref.eval()


def diffusers_vae(ae) -> AutoencoderKLFlux2:
    ref = AutoencoderKLFlux2(**_kwargs(ae))
    ref.load_state_dict(vae_bfl_to_diffusers(dict(ae.state_dict())), strict=True)
    return ref.eval()


def grid_ids(t: int, h: int, w: int) -> torch.Tensor:
    """(h*w, 4) ids (t, y, x, 0), row-major over (y, x)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(y, t), y, x, torch.zeros_like(y)], -1).reshape(-1, 4)


def inputs(cfg, batch: int = 2, seed: int = 1, n_txt: int = 12):
    """Text, a 4x6 target image and two references (t=10 on 2x3, t=20 on 3x2), each on its own grid."""
    g = torch.Generator().manual_seed(seed)
    ids = {"img": grid_ids(0, 4, 6), "ref": torch.cat([grid_ids(10, 2, 3), grid_ids(20, 3, 2)])}
    tok = {k: torch.randn(batch, len(v), cfg.in_channels, generator=g) for k, v in ids.items()}
    txt_ids = torch.stack([torch.zeros(n_txt), torch.zeros(n_txt), torch.zeros(n_txt), torch.arange(n_txt)], -1)
    return {
        "img": tok["img"], "img_ids": ids["img"], "ref": tok["ref"], "ref_ids": ids["ref"],
        "ctx": torch.randn(batch, n_txt, cfg.context_in_dim, generator=g), "ctx_ids": txt_ids.long(),
        "t": torch.tensor([0.7, 0.35])[:batch], "g": torch.full((batch,), 4.0) if cfg.use_guidance_embed else None,
    }  # fmt: skip


def _b(ids: torch.Tensor, batch: int) -> torch.Tensor:
    return ids[None].expand(batch, -1, -1)


def run_ours(model, d, dtype=torch.float32):
    x = torch.cat([d["img"], d["ref"]], 1).to(dtype)
    x_ids, b = torch.cat([d["img_ids"], d["ref_ids"]]), x.shape[0]
    return model(x, _b(x_ids, b), d["t"], d["ctx"].to(dtype), _b(d["ctx_ids"], b), d["g"]).float()


def run_diffusers(ref, d, dtype=torch.float32):
    x = torch.cat([d["img"], d["ref"]], 1).to(dtype)
    out = ref(hidden_states=x, encoder_hidden_states=d["ctx"].to(dtype), timestep=d["t"],
              img_ids=torch.cat([d["img_ids"], d["ref_ids"]]), txt_ids=d["ctx_ids"], guidance=d["g"],
              return_dict=False)  # fmt: skip
    return out[0].float()


@pytest.mark.parametrize("cfg", [TINY_TRANSFORMER, KLEIN_TINY], ids=["guidance", "no-guidance"])
@torch.no_grad()
def test_transformer_matches_diffusers_fp32(cfg):
    model = tiny_flux2(cfg, seed=3)
    d = inputs(cfg)
    ours, theirs = run_ours(model, d), run_diffusers(diffusers_transformer(model), d)
    assert ours.shape == (2, 24 + 12, cfg.in_channels)
    assert ours.abs().max() > 0.1  # non-trivial output
    diff = (ours - theirs).abs().max().item()
    print(f"transformer fp32 {cfg.use_guidance_embed=}: max abs diff {diff:.2e}")
    assert diff <= FP32_TOL


@torch.no_grad()
def test_transformer_bf16_loaded_through_our_loader_agrees_loosely(tmp_path):
    model = tiny_flux2(TINY_TRANSFORMER, seed=4)
    d = inputs(TINY_TRANSFORMER)
    exact = run_ours(model, d)
    ours_bf16, _ = load_transformer(save_bfl(model, tmp_path / "t.safetensors"), dtype=torch.bfloat16)
    theirs_bf16 = diffusers_transformer(model).to(torch.bfloat16)
    a, b = run_ours(ours_bf16, d, torch.bfloat16), run_diffusers(theirs_bf16, d, torch.bfloat16)
    scale = exact.abs().max().item()
    diff, err = (a - b).abs().max().item(), (a - exact).abs().max().item()
    print(f"transformer bf16: ours vs diffusers {diff:.2e}, ours vs fp32 {err:.2e}, output scale {scale:.2f}")
    assert diff <= 0.05 * scale and err <= 0.05 * scale


@pytest.mark.parametrize("cfg", [KLEIN_TINY, TINY_TRANSFORMER], ids=["klein", "guidance"])
@torch.no_grad()
def test_kv_extract_and_cached_match_diffusers(cfg):
    model = tiny_flux2(cfg, seed=5)
    ref = diffusers_transformer(model)
    for block in ref.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    d, b = inputs(cfg), 2
    ours0, kv = model.forward_kv_extract(d["img"], _b(d["img_ids"], b), d["ref"], _b(d["ref_ids"], b), d["t"],
                                         d["ctx"], _b(d["ctx_ids"], b), d["g"])  # fmt: skip
    theirs0, cache = ref(hidden_states=torch.cat([d["ref"], d["img"]], 1), encoder_hidden_states=d["ctx"],
                         timestep=d["t"], img_ids=torch.cat([d["ref_ids"], d["img_ids"]]), txt_ids=d["ctx_ids"],
                         guidance=d["g"], return_dict=False, kv_cache_mode="extract",
                         num_ref_tokens=d["ref"].shape[1])  # fmt: skip
    x1, t1 = torch.randn_like(d["img"]), torch.tensor([0.3, 0.2])
    ours1 = model(x1, _b(d["img_ids"], b), t1, d["ctx"], _b(d["ctx_ids"], b), d["g"], kv=kv)
    theirs1 = ref(hidden_states=x1, encoder_hidden_states=d["ctx"], timestep=t1, img_ids=d["img_ids"],
                  txt_ids=d["ctx_ids"], guidance=d["g"], return_dict=False, kv_cache=cache,
                  kv_cache_mode="cached")[0]  # fmt: skip
    assert ours0.shape == theirs0.shape == (2, 24, cfg.in_channels)
    diffs = [(ours0 - theirs0).abs().max().item(), (ours1 - theirs1).abs().max().item()]
    print(f"kv {cfg.use_guidance_embed=}: extract {diffs[0]:.2e}, cached {diffs[1]:.2e}")
    assert max(diffs) <= FP32_TOL
    plain = model(d["img"], _b(d["img_ids"], b), d["t"], d["ctx"], _b(d["ctx_ids"], b), d["g"])
    assert (plain - ours0).abs().max() > 1e-3  # the references really changed the prediction


def test_diffusers_from_pretrained_reads_our_folder(tmp_path):
    model = tiny_flux2(TINY_TRANSFORMER, seed=6)
    folder = save_diffusers(model, tmp_path / "transformer", shard_bytes=100_000)
    loaded = Flux2Transformer2DModel.from_pretrained(folder)
    want = transformer_bfl_to_diffusers(dict(model.state_dict()))
    got = loaded.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    ae = tiny_autoencoder(TINY_AE, seed=6)
    vae = AutoencoderKLFlux2.from_pretrained(save_diffusers(ae, tmp_path / "vae"))
    want = vae_bfl_to_diffusers(dict(ae.state_dict()))
    assert all(torch.equal(vae.state_dict()[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------------ VAE
def patchify_by_hand(z: torch.Tensor) -> torch.Tensor:
    """Spec §5.4: latent (c, 2i+pi, 2j+pj) -> channel c*4 + pi*2 + pj at (i, j)."""
    parts = [z[:, :, pi::2, pj::2] for pi in (0, 1) for pj in (0, 1)]  # each (B, c, h/2, w/2)
    return torch.stack(parts, 2).flatten(1, 2)


def unpatchify_by_hand(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    out = z.new_empty(b, c4 // 4, 2 * h, 2 * w)
    parts = z.unflatten(1, (c4 // 4, 4))
    for n, (pi, pj) in enumerate((pi, pj) for pi in (0, 1) for pj in (0, 1)):
        out[:, :, pi::2, pj::2] = parts[:, :, n]
    return out


def _bn(vae):
    eps = vae.config.batch_norm_eps
    return vae.bn.running_mean.float().view(1, -1, 1, 1), (vae.bn.running_var.float().view(1, -1, 1, 1) + eps).sqrt()


@torch.no_grad()
def test_vae_encode_decode_match_diffusers_fp32(tmp_path):
    ae = tiny_autoencoder(TINY_AE, seed=7)
    vae = diffusers_vae(ae)
    loaded = load_autoencoder(save_bfl(ae, tmp_path / "ae.safetensors"))
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    mean, std = _bn(vae)
    theirs = (patchify_by_hand(vae.encode(x).latent_dist.mode()) - mean) / std
    ours = loaded.encode(x)
    assert ours.shape == (2, 128, 2, 3)
    z = torch.randn(2, 128, 2, 3, generator=g)
    img_ours = loaded.decode(z)
    img_theirs = vae.decode(unpatchify_by_hand(z * std + mean)).sample
    diffs = [(ours - theirs).abs().max().item(), (img_ours - img_theirs).abs().max().item()]
    print(f"vae fp32: encode {diffs[0]:.2e}, decode {diffs[1]:.2e}")
    assert img_ours.shape == (2, 3, 32, 48) and img_ours.abs().max() > 0.1
    assert max(diffs) <= FP32_TOL


@torch.no_grad()
def test_vae_bf16_agrees_loosely(tmp_path):
    ae = tiny_autoencoder(TINY_AE, seed=9)
    vae = diffusers_vae(ae)
    mean, std = _bn(vae)  # fp32 statistics, as the reference keeps them
    half = load_autoencoder(save_bfl(ae, tmp_path / "ae.safetensors"), dtype=torch.bfloat16)
    vae = vae.to(torch.bfloat16)
    x = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(10)) * 2 - 1).to(torch.bfloat16)
    ours = half.encode(x)  # bf16 encoder, fp32 normalisation
    theirs = (patchify_by_hand(vae.encode(x).latent_dist.mode().float()) - mean) / std
    exact = ae.encode(x.float())
    lat = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(11))
    img_ours, img_theirs = half.decoder(lat.bfloat16()).float(), vae.decode(lat.bfloat16()).sample.float()
    img_exact = ae.decoder(lat)
    for a, b, ref, what in ((ours, theirs, exact, "encode"), (img_ours, img_theirs, img_exact, "decode")):
        scale = ref.abs().max().item()
        diff, err = (a - b).abs().max().item(), (a - ref).abs().max().item()
        print(f"vae bf16 {what}: ours vs diffusers {diff:.2e}, ours vs fp32 {err:.2e}, scale {scale:.2f}")
        assert diff <= 0.05 * scale and err <= 0.05 * scale
