"""Training the embedded model's autoencoder (the FLUX.2 VAE architecture, scaled down, z = 32).

Reconstruction MSE on renders of the shapes world with a small KL term on the posterior, sampled during
training as a VAE is; inference uses the mean only, as FLUX.2 does. Afterwards the BatchNorm statistics of the
128 patchified latent channels are measured over the data set, which is what FLUX.2's `bn` buffers hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.autoencoder import AutoEncoder, patchify
from .schedule import Budget, cosine_optim, optimizer_step


def to_pixels(u8: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float in [-1, 1]."""
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _crops(x: torch.Tensor, size: int | None, g: torch.Generator) -> torch.Tensor:
    """One random (size x size) crop per image, aligned to 16 px (the VAE is convolutional but for its mid)."""
    if size is None or size >= x.shape[-1]:
        return x
    top, left = (int(v) * 16 for v in torch.randint((x.shape[-1] - size) // 16 + 1, (2,), generator=g, device=x.device))
    return x[..., top : top + size, left : left + size]


def train_vae(ae: AutoEncoder, images: torch.Tensor, budget: Budget, batch: int, lr=1e-3, kl=1e-6, seed=0,
              crop: int | None = None, clip: float = 0.0, log=print):  # fmt: skip
    """Train in place on uint8 `images` (N, S, S, 3) already on the training device, on random `crop`-pixel
    crops (whole images if None); loss MSE + 0.1 L1 + kl * KL, gradient norm clipped to `clip` if > 0. Returns
    the last loss."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    opt, sched = cosine_optim(ae.parameters(), lr, budget, floor=0.02)
    ae.train()
    loss, step = torch.tensor(0.0), 0
    while budget.running(step):
        x = _crops(to_pixels(images[torch.randint(len(images), (batch,), generator=g, device=images.device)]), crop, g)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            mean, logvar = ae.encoder(x).float().chunk(2, dim=1)
            z = mean + torch.exp(0.5 * logvar.clamp(-20, 10)) * torch.randn_like(mean)
            rec = ae.decoder(z).float()
        kl_term = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + kl * kl_term
        optimizer_step(opt, sched, loss, list(ae.parameters()) if clip > 0 else None, clip)
        step = budget.tick(step, log, 250, lambda: f"vae loss {loss.item():.5f}")
    ae.eval().requires_grad_(False)
    return float(loss.detach())


@torch.no_grad()
def reconstruction_mse(ae: AutoEncoder, images: torch.Tensor, batch: int = 256) -> float:
    """Mean squared error, in [-1, 1] pixels, of decode(encode(x)) (the posterior mean, as inference uses) over
    uint8 `images` (N, S, S, 3) on the AE's device."""
    total = 0.0
    for i in range(0, len(images), batch):
        x = to_pixels(images[i : i + batch])
        total += F.mse_loss(ae.decode(ae.encode(x)).float(), x, reduction="sum").item()
    return total / images.numel()


@torch.no_grad()
def fit_latent_stats(ae: AutoEncoder, images: torch.Tensor, batch: int = 256) -> None:
    """Set bn.running_mean/var to the per-channel statistics of the patchified posterior means."""
    total, sq, n = 0.0, 0.0, 0
    for i in range(0, len(images), batch):
        z = patchify(ae.encoder(to_pixels(images[i : i + batch]))[:, : ae.cfg.z_channels]).double()
        total = total + z.sum(dim=(0, 2, 3))
        sq = sq + z.pow(2).sum(dim=(0, 2, 3))
        n += z.shape[0] * z.shape[2] * z.shape[3]
    mean = total / n
    ae.bn.running_mean.copy_(mean.float())
    ae.bn.running_var.copy_((sq / n - mean.pow(2)).clamp_min(1e-8).float())


@torch.no_grad()
def encode_all(ae: AutoEncoder, images: torch.Tensor, batch: int = 256, dtype=torch.bfloat16) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, S/16 * S/16, 128) normalised latent tokens in `dtype`."""
    out = []
    for i in range(0, len(images), batch):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
            z = ae.encode(to_pixels(images[i : i + batch]))
        out.append(z.flatten(2).transpose(1, 2).to(dtype))
    return torch.cat(out)
