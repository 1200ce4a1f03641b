"""The FLUX.2 autoencoder: math only; module names are the keys of `ae.safetensors`.

Contract:
    encode(x)  (B, 3, H, W) in [-1, 1]              -> (B, 128, H/16, W/16) normalised latent
    decode(z)  (B, 128, H/16, W/16) normalised latent -> (B, 3, H, W) in about [-1, 1]
`encode` keeps only the mean half of the encoder's moments (no sampling), patchifies 2x2 into channels in
(c, pi, pj) order and applies the BatchNorm running statistics (eps 1e-4); `decode` inverts both.
Runs in the dtype of its weights (fp32 for the official file).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoEncoderConfig


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6, affine=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6, affine=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions with 1x1-conv projections."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6, affine=True)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (p(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, c)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv (the reference's asymmetric padding)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, then an optional `downsample` / `upsample`."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n))
        self.attn = nn.ModuleList()  # empty in FLUX.2; kept so the module tree matches the reference
        if resample == "down":
            self.downsample = Downsample(c_out)
        elif resample == "up":
            self.upsample = Upsample(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.block:
            x = b(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        ins = [cfg.ch] + chans[:-1]
        last = len(chans) - 1
        self.down = nn.ModuleList(
            _Level(ins[i], chans[i], cfg.num_res_blocks, g, "down" if i < last else None) for i in range(len(chans))
        )
        self.mid = _Mid(chans[-1], g)
        self.norm_out = nn.GroupNorm(g, chans[-1], eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.conv_out(swish(self.norm_out(self.mid(h))))
        return self.quant_conv(h)  # (B, 2z, H/8, W/8) moments: [mean | logvar]


class Decoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = _Mid(chans[-1], g)
        # up.{i} is stored by level index i, but runs from the last (lowest resolution) level to level 0.
        outs = [chans[min(i + 1, len(chans) - 1)] for i in range(len(chans))]  # input channels of each level
        self.up = nn.ModuleList(
            _Level(outs[i], chans[i], cfg.num_res_blocks + 1, g, "up" if i > 0 else None) for i in range(len(chans))
        )
        self.norm_out = nn.GroupNorm(g, chans[0], eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, c, 2i+pi, 2j+pj) -> (B, c*4 + pi*2 + pj, i, j)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`: (B, 4c, i, j) -> (B, c, 2i, 2j)."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


class AutoEncoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Latent statistics of the 128 patchified channels, used as a fixed normaliser (never updated).
        self.bn = nn.BatchNorm2d(cfg.latent_channels, eps=cfg.bn_eps, momentum=0.1, affine=False)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, var = self.bn.running_mean.view(1, -1, 1, 1), self.bn.running_var.view(1, -1, 1, 1)
        return (z - mean) / torch.sqrt(var + self.cfg.bn_eps)

    def inv_normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, var = self.bn.running_mean.view(1, -1, 1, 1), self.bn.running_var.view(1, -1, 1, 1)
        return z * torch.sqrt(var + self.cfg.bn_eps) + mean

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.encoder(x)[:, : self.cfg.z_channels]  # mean of the posterior, no sampling
        return self.normalize(patchify(mean))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # The statistics stay fp32; cast back to the decoder's dtype so a bf16 VAE decodes too.
        return self.decoder(unpatchify(self.inv_normalize(z)).to(self.decoder.conv_in.weight.dtype))
