"""Sampling parity with diffusers 0.42.1: schedule, reference preprocessing and whole denoising runs.

Tiny random fp32 weights are built in our layout, converted with `loading.keymaps` and loaded strictly into
diffusers' `Flux2Transformer2DModel` / `AutoencoderKLFlux2`; the pipelines get the same prompt embeddings,
noise and reference images, and their `output_type="latent"` results are compared with ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_flow
from fluxrt.config import TINY, replace
from fluxrt.loading.keymaps import transformer_bfl_to_diffusers, vae_bfl_to_diffusers
from fluxrt.models.autoencoder import AutoEncoder, unpatchify
from fluxrt.models.transformer import Flux2
from fluxrt.sampling import references as R
from fluxrt.sampling.latents import pack
from fluxrt.sampling.run import sample
from fluxrt.sampling.schedule import compute_empirical_mu, get_schedule

pytestmark = pytest.mark.parity
diffusers = pytest.importorskip("diffusers", reason="parity tests need `pip install fluxrt[parity]`")
from diffusers import (  # noqa: E402
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2 import pipeline_flux2  # noqa: E402

# The scheduler config shipped with the FLUX.2 checkpoints (dynamic shifting driven by the pipeline's mu).
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}  # fmt: skip
N_TXT = 16
LATENT_TOL = 1e-4


def _scheduler():
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("steps", [4, 28, 50])
@pytest.mark.parametrize("width, height", [(512, 512), (1024, 1024), (1360, 768), (2048, 2048)])
def test_schedule_matches_diffusers(width, height, steps):
    seq_len = (height // 16) * (width // 16)
    mu = pipeline_flux2.compute_empirical_mu(image_seq_len=seq_len, num_steps=steps)
    assert compute_empirical_mu(seq_len, steps) == pytest.approx(mu, abs=1e-12)
    sched = _scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    theirs = sched.sigmas.double()
    ours = torch.tensor(get_schedule(steps, seq_len), dtype=torch.float64)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-6


# ---------------------------------------------------------------- tiny models, ours and diffusers'


def _diffusers_flow(model: Flux2) -> Flux2Transformer2DModel:
    c = model.cfg
    theirs = Flux2Transformer2DModel(
        patch_size=1, in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
        timestep_guidance_channels=256, mlp_ratio=c.mlp_ratio, axes_dims_rope=tuple(c.axes_dim),
        rope_theta=c.theta, guidance_embeds=c.use_guidance_embed,
    )  # fmt: skip
    theirs.load_state_dict(transformer_bfl_to_diffusers(model.state_dict()), strict=True)
    return theirs.eval()


@pytest.fixture(scope="module")
def ae() -> AutoEncoder:
    torch.manual_seed(2)
    ae = AutoEncoder(TINY.autoencoder).eval()
    with torch.no_grad():
        ae.bn.running_mean.normal_(0, 0.3)
        ae.bn.running_var.uniform_(0.5, 2.0)
    return ae


def _diffusers_vae(ae: AutoEncoder) -> AutoencoderKLFlux2:
    c = ae.cfg
    n = len(c.ch_mult)
    theirs = AutoencoderKLFlux2(
        in_channels=c.in_channels, out_channels=c.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        layers_per_block=c.num_res_blocks, latent_channels=c.z_channels, norm_num_groups=c.norm_groups,
        batch_norm_eps=c.bn_eps,
    )  # fmt: skip
    theirs.load_state_dict(vae_bfl_to_diffusers(ae.state_dict()), strict=True)
    return theirs.eval()


def _pipe(cls, ae, model, **kw):
    return cls(scheduler=_scheduler(), vae=_diffusers_vae(ae), text_encoder=None, tokenizer=None,
               transformer=_diffusers_flow(model), **kw)  # fmt: skip


def _rgb(w, h, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _case(batch, h, w, seed=0):
    """Noise (B, 128, h, w) and prompt / negative embeddings (B, N_TXT, 48), all fp32."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 128, h, w, generator=g)
    ctx = torch.randn(batch, N_TXT, TINY.transformer.context_in_dim, generator=g)
    neg = torch.randn(batch, N_TXT, TINY.transformer.context_in_dim, generator=g)
    return noise, ctx, neg


def _to_vae_latent(ae: AutoEncoder, z: torch.Tensor) -> torch.Tensor:
    """Our normalised (B, 128, h, w) -> the de-normalised, unpatchified (B, 32, 2h, 2w) klein pipelines return."""
    return unpatchify(ae.inv_normalize(z))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- reference preprocessing


class _Captured(Exception):
    pass


def _diffusers_condition_images(pipe, images) -> list[torch.Tensor]:
    """Run the pipeline's own reference preprocessing and stop before the VAE (returns its (1, 3, H, W) tensors)."""
    seen = []

    def capture(images, **kw):
        seen.extend(images)
        raise _Captured

    pipe.prepare_image_latents = capture
    _, ctx, _ = _case(1, 1, 1)
    with pytest.raises(_Captured), torch.no_grad():
        pipe(image=images, prompt_embeds=ctx, height=64, width=64, num_inference_steps=1, output_type="latent")
    return seen


@pytest.mark.parametrize("sizes", [[(1500, 1000)], [(3000, 400), (67, 100)], [(1100, 1100), (1031, 517)]])
def test_reference_preprocessing_matches_diffusers(ae, sizes):
    images = [_rgb(w, h, i) for i, (w, h) in enumerate(sizes)]
    pipe = _pipe(Flux2Pipeline, ae, tiny_flow(True))
    theirs = _diffusers_condition_images(pipe, images)
    ours = [R.image_to_tensor(im) for im in R.prepare_references(images, cap="diffusers")]
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b.float())


def test_single_large_reference_bfl_cap_differs_from_diffusers():
    img = [_rgb(1500, 1000, 0)]
    assert R.prepare_references(img, cap="bfl")[0].size == (1488, 992)
    assert R.prepare_references(img, cap="diffusers")[0].size == (1248, 832)


# ---------------------------------------------------------------- whole sampling runs


@pytest.mark.parametrize("steps, size", [(4, (4, 6)), (6, (5, 4))])
def test_dev_t2i_matches_diffusers(ae, steps, size):
    model = tiny_flow(True)
    noise, ctx, _ = _case(2, *size, seed=steps)
    pipe = _pipe(Flux2Pipeline, ae, model)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=ctx, latents=noise, height=16 * size[0], width=16 * size[1],
                      num_inference_steps=steps, guidance_scale=4.0, output_type="latent").images  # fmt: skip
    ours = sample(model, noise, ctx, num_steps=steps, mode="embedded", guidance=4.0)
    diff = _max_diff(pack(ours), theirs)  # Flux2Pipeline returns packed, normalised (B, L, 128)
    print(f"dev t2i steps={steps} size={size}: max |diff| = {diff:.3g}")
    assert diff <= LATENT_TOL


def test_dev_two_references_match_diffusers(ae):
    model = tiny_flow(True)
    noise, ctx, _ = _case(2, 4, 5, seed=7)
    images = [_rgb(88, 70, 1), _rgb(67, 100, 2)]  # cropped to 80x64 and 64x96 by both
    pipe = _pipe(Flux2Pipeline, ae, model)
    with torch.no_grad():
        theirs = pipe(image=images, prompt_embeds=ctx, latents=noise, height=64, width=80, num_inference_steps=4,
                      guidance_scale=4.0, output_type="latent").images  # fmt: skip
        ref, ref_ids = R.encode_references(ae, images, dtype=torch.float32, cap="diffusers")
        ours = sample(model, noise, ctx, num_steps=4, mode="embedded", guidance=4.0, ref=ref, ref_ids=ref_ids)
        no_ref = sample(model, noise, ctx, num_steps=4, mode="embedded", guidance=4.0)
    diff = _max_diff(pack(ours), theirs)
    print(f"dev 2 refs: max |diff| = {diff:.3g}, reference effect = {_max_diff(ours, no_ref):.3g}")
    assert diff <= LATENT_TOL
    assert _max_diff(ours, no_ref) > 100 * LATENT_TOL  # the references matter


@pytest.mark.parametrize("with_ref", [False, True])
def test_klein_base_cfg_matches_diffusers(ae, with_ref):
    model = tiny_flow(False)
    noise, ctx, neg = _case(2, 4, 4, seed=11)
    images = [_rgb(70, 90, 3)] if with_ref else None
    pipe = _pipe(Flux2KleinPipeline, ae, model, is_distilled=False)
    with torch.no_grad():
        theirs = pipe(image=images, prompt_embeds=ctx, negative_prompt_embeds=neg, latents=noise, height=64,
                      width=64, num_inference_steps=5, guidance_scale=4.0, output_type="latent").images  # fmt: skip
        ref, ref_ids = R.encode_references(ae, images, dtype=torch.float32) if with_ref else (None, None)
        ours = sample(model, noise, ctx, num_steps=5, mode="cfg", guidance=4.0, neg_ctx=neg, ref=ref, ref_ids=ref_ids)
        ours = _to_vae_latent(ae, ours)  # klein pipelines return de-normalised (B, 32, H/8, W/8)
    diff = _max_diff(ours, theirs)
    print(f"klein base cfg refs={with_ref}: max |diff| = {diff:.3g}")
    assert diff <= LATENT_TOL


def test_klein_kv_matches_diffusers(ae):
    model = tiny_flow(False)
    noise, ctx, _ = _case(2, 4, 4, seed=13)
    images = [_rgb(100, 75, 4)]  # cropped to 96x64
    pipe = _pipe(Flux2KleinKVPipeline, ae, model)
    with torch.no_grad():
        theirs = pipe(image=images, prompt_embeds=ctx, latents=noise, height=64, width=64, num_inference_steps=4,
                      output_type="latent").images  # fmt: skip
        ref, ref_ids = R.encode_references(ae, images, dtype=torch.float32)
        ours = _to_vae_latent(ae, sample(model, noise, ctx, num_steps=4, mode="kv", ref=ref, ref_ids=ref_ids))
        plain = _to_vae_latent(ae, sample(model, noise, ctx, num_steps=4, mode="distilled", ref=ref, ref_ids=ref_ids))
    diff = _max_diff(ours, theirs)
    print(f"klein kv 1 ref: max |diff| = {diff:.3g}; kv vs plain refs = {_max_diff(ours, plain):.3g}")
    assert diff <= LATENT_TOL
    assert _max_diff(ours, plain) > 100 * LATENT_TOL  # the KV pattern is exercised, not the plain one
