"""Batch parallelism: the rows of one forward's batch split over the ranks (CFG halves, several images).

`BatchParallel(model, group)` has `Flux2.forward`'s contract. With a batch B that the group size n divides, rank r
runs rows [r*B/n, (r+1)*B/n) and the outputs are all-gathered, so every rank returns the full (B, L_img, 128)
output, equal to one process's (each row's computation is the same, only on another GPU). The sampler batches a
CFG model's unconditional and conditional halves into one forward of 2B rows (`sampling.denoise.cfg_velocity`),
so on 2 ranks klein base runs each half on its own GPU with one all-gather per step; B images split the same way.
A batch n does not divide runs whole on every rank (same result, no speed-up). No weights are split: every rank
holds the whole model. The klein KV-cache forward is not supported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..accel.cache import share_step_cache


class BatchParallel(nn.Module):
    def __init__(self, model: nn.Module, group=None):
        super().__init__()
        self.model = model
        self.group = group if group is not None else dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        share_step_cache(self, model, self.group)  # a step cache decides from every rank's rows

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None, kv=None):
        """Same contract as `Flux2.forward`; `kv` is not supported."""
        if kv is not None:
            raise NotImplementedError("the klein KV-cache forward is not supported under batch parallelism")
        b = x.shape[0]
        if b % self.world:
            return self.model(x, x_ids, timesteps, ctx, ctx_ids, guidance=guidance)
        rows = slice(self.rank * b // self.world, (self.rank + 1) * b // self.world)

        def mine(t):  # batch-1 ids (and guidance) broadcast: every rank keeps them whole
            return t if t is None or t.shape[0] != b else t[rows]

        part = self.model(mine(x), mine(x_ids), mine(timesteps), mine(ctx), mine(ctx_ids), guidance=mine(guidance))
        parts = [torch.empty_like(part) for _ in range(self.world)]
        dist.all_gather(parts, part.contiguous(), group=self.group)
        return torch.cat(parts)

    def forward_kv_extract(self, *args, **kwargs):
        raise NotImplementedError("the klein KV-cache forward is not supported under batch parallelism")
