"""One call from noise to clean latents: schedule, ids, guidance policy and Euler, over tensors only.

`sample(model, noise, ctx, ...)` takes the noise latent (B, 128, h, w) in the compute dtype and text features
(B, L_txt, C), picks the velocity function for `mode` and returns the denoised latent (B, 128, h, w),
still BatchNorm-normalised (decode it with `AutoEncoder.decode`). Modes follow `ModelSpec.guidance_mode`:
"embedded" (dev: `guidance` feeds the guidance embedding), "distilled" (klein: no guidance), "cfg" (klein base:
true CFG with scale `guidance` against `neg_ctx`), plus "kv" (klein 9B KV: reference K/V cached at step 0).
"""

from __future__ import annotations

import torch

from .denoise import cfg_velocity, euler, guided_velocity, kv_velocity
from .latents import grid_ids, pack, text_ids, unpack
from .schedule import get_schedule

MODES = ("embedded", "distilled", "cfg", "kv")


def make_velocity(model, mode, img_ids, ctx, ctx_ids, guidance=None, neg_ctx=None, ref=None, ref_ids=None):
    """The velocity function of a guidance `mode` (see the module docstring); references are optional."""
    if mode == "embedded":
        return guided_velocity(model, img_ids, ctx, ctx_ids, guidance, ref, ref_ids)
    if mode == "distilled" or (mode == "kv" and ref is None):  # KV without references is the plain model
        return guided_velocity(model, img_ids, ctx, ctx_ids, None, ref, ref_ids)
    if mode == "cfg":
        if neg_ctx is None:
            raise ValueError("mode 'cfg' needs neg_ctx (the empty-prompt features)")
        return cfg_velocity(model, img_ids, ctx, neg_ctx, ctx_ids, guidance, ref, ref_ids)
    if mode == "kv":
        return kv_velocity(model, img_ids, ctx, ctx_ids, ref, ref_ids)
    raise ValueError(f"unknown sampling mode {mode!r}; known: {', '.join(MODES)}")


@torch.no_grad()
def sample(
    model, noise: torch.Tensor, ctx: torch.Tensor, ctx_ids: torch.Tensor | None = None, *,
    num_steps: int = 50, timesteps: list[float] | None = None, mode: str = "embedded", guidance: float = 4.0,
    neg_ctx: torch.Tensor | None = None, ref: torch.Tensor | None = None, ref_ids: torch.Tensor | None = None,
    callback=None,
) -> torch.Tensor:  # fmt: skip
    """Denoise `noise` (B, 128, h, w) from t = 1 to 0; returns (B, 128, h, w) in noise's dtype.

    ctx (B, L_txt, C), ctx_ids (B or 1, L_txt, 4) (default (0, 0, 0, l)); ref (1 or B, L_ref, 128) and ref_ids
    from `encode_references`. `timesteps` overrides the schedule `get_schedule(num_steps, h * w)`.
    """
    _, _, h, w = noise.shape
    if ctx_ids is None:
        ctx_ids = text_ids(ctx.shape[1], ctx.device)[None]
    if timesteps is None:
        timesteps = get_schedule(num_steps, h * w)
    img_ids = grid_ids(h, w, device=noise.device)[None]  # (1, h*w, 4)
    velocity = make_velocity(model, mode, img_ids, ctx, ctx_ids, guidance, neg_ctx, ref, ref_ids)
    return unpack(euler(velocity, pack(noise), timesteps, callback), h, w)
