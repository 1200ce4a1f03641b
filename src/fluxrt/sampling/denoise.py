"""The sampler: plain functions over tensors; the denoiser is an argument.

`euler(velocity, img, timesteps)` integrates dx/dt = v from t = 1 to 0. The guidance policy lives in the
velocity functions built here: embedded guidance (dev), none (klein distilled), true CFG batched into one
forward (klein base), and the klein-9B-KV reference cache. All tensors are (B, L, C) tokens; references are
appended after the image tokens un-noised, and their predictions are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class Denoiser(Protocol):
    def __call__(self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None) -> torch.Tensor: ...


Velocity = Callable[[torch.Tensor, float, int], torch.Tensor]


def euler(velocity: Velocity, img: torch.Tensor, timesteps: list[float], callback=None) -> torch.Tensor:
    """Euler steps over consecutive (t_curr, t_prev) pairs, in img's dtype; callback(step, img) after each."""
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        pred = velocity(img, t_curr, i)
        img = img + (t_prev - t_curr) * pred
        if callback is not None:
            callback(i, img)
    return img


def _full(img: torch.Tensor, value: float, n: int | None = None) -> torch.Tensor:
    return torch.full((n or img.shape[0],), value, dtype=img.dtype, device=img.device)


def _batched_refs(img, img_ids, ref, ref_ids):
    """Broadcast (1, L_ref, .) references to the batch of img / img_ids and cast them to img's dtype."""
    return ref.to(img.dtype).expand(img.shape[0], -1, -1), ref_ids.expand(img_ids.shape[0], -1, -1)


def _with_refs(img, img_ids, ref, ref_ids):
    if ref is None:
        return img, img_ids
    ref, ref_ids = _batched_refs(img, img_ids, ref, ref_ids)
    return torch.cat([img, ref], dim=1), torch.cat([img_ids, ref_ids], dim=1)


def guided_velocity(model: Denoiser, img_ids, ctx, ctx_ids, guidance=None, ref=None, ref_ids=None) -> Velocity:
    """One forward per step; `guidance` feeds dev's guidance embedding (None for klein distilled)."""

    def velocity(img, t, step):
        x, ids = _with_refs(img, img_ids, ref, ref_ids)
        g = None if guidance is None else _full(img, guidance)
        return model(x, ids, _full(img, t), ctx, ctx_ids, guidance=g)[:, : img.shape[1]]

    return velocity


def _twice(ids: torch.Tensor) -> torch.Tensor:
    """Ids for the doubled CFG batch; batch-1 ids broadcast and stay as they are."""
    return ids if ids.shape[0] == 1 else torch.cat([ids, ids])


def cfg_velocity(model: Denoiser, img_ids, ctx, neg_ctx, ctx_ids, scale: float, ref=None, ref_ids=None) -> Velocity:
    """True CFG with the unconditional and conditional halves batched into one forward: u + s (c - u)."""

    def velocity(img, t, step):
        x, ids = _with_refs(img, img_ids, ref, ref_ids)
        pred = model(
            torch.cat([x, x]), _twice(ids), _full(img, t, 2 * img.shape[0]),
            torch.cat([neg_ctx, ctx]), _twice(ctx_ids), guidance=None,
        )[:, : img.shape[1]]  # fmt: skip
        uncond, cond = pred.chunk(2)
        return uncond + scale * (cond - uncond)

    return velocity


def kv_velocity(model, img_ids, ctx, ctx_ids, ref, ref_ids, guidance=None) -> Velocity:
    """klein-9B-KV: step 0 runs [ref, img] and caches the reference K/V; later steps run [img] only."""
    state = {}

    def velocity(img, t, step):
        g = None if guidance is None else _full(img, guidance)
        if step == 0:
            r, r_ids = _batched_refs(img, img_ids, ref, ref_ids)
            pred, state["kv"] = model.forward_kv_extract(img, img_ids, r, r_ids, _full(img, t), ctx, ctx_ids, g)
            return pred
        return model(img, img_ids, _full(img, t), ctx, ctx_ids, guidance=g, kv=state["kv"])

    return velocity
