"""Packing latents into tokens and building their (t, h, w, l) position ids.

Text tokens get (0, 0, 0, l); output image tokens (0, y, x, 0); reference i gets (10 + 10 i, y, x, 0) on its
own latent grid. Tokens are the (B, 128, h, w) latent flattened row-major to (B, h*w, 128).
"""

from __future__ import annotations

import torch

REF_T_SCALE = 10  # reference i sits at time coordinate 10 + 10 i, far from the output image's t = 0


def grid_ids(h: int, w: int, t: int = 0, device=None) -> torch.Tensor:
    """(h*w, 4) int64 ids (t, y, x, 0) in row-major order."""
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.zeros(h * w, 4, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, y.flatten(), x.flatten()
    return ids


def text_ids(length: int, device=None) -> torch.Tensor:
    """(length, 4) int64 ids (0, 0, 0, l)."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return z.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).unflatten(2, (h, w))


def reference_tokens(latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference latents [(1, 128, h_i, w_i)] -> tokens (1, sum L_i, 128) and ids (1, sum L_i, 4)."""
    toks = [pack(z) for z in latents]
    ids = [grid_ids(z.shape[-2], z.shape[-1], REF_T_SCALE * (i + 1), z.device) for i, z in enumerate(latents)]
    return torch.cat(toks, dim=1), torch.cat(ids, dim=0)[None]


def noise(seeds: list[int], h: int, w: int, channels: int = 128, device="cpu", dtype=torch.bfloat16) -> torch.Tensor:
    """(B, channels, h, w) Gaussian noise, sample b drawn from its own generator seeded with seeds[b]."""
    out = []
    for s in seeds:
        g = torch.Generator(device=device).manual_seed(int(s))
        out.append(torch.randn(1, channels, h, w, generator=g, device=device, dtype=dtype))
    return torch.cat(out)
