"""Low-resolution previews of a latent during denoising, without running the VAE decoder.

Contract:
    LatentPreview.fit(ae) -> LatentPreview   a linear map from one 128-channel latent token to the mean RGB of the
        16x16 pixels it covers, fitted by least squares on the VAE's own encodings of synthetic colour-block images
        (8 tiny encodes, once per autoencoder)
    .observe(tokens, images)   adds the final latents and decoded images of a batch and refits on the model's own
        outputs alone, so the map follows what the model actually makes (the worker calls it after every batch once
        previews are in use); the colour-block fit is only the cold start: a model's final latents can sit far from
        the VAE's encodings of flat colour blocks (35% apart for the embedded model), where the blocks mislead
    .preview(tokens (L, 128), h, w) -> PIL image of (w x h) latent cells, upscaled `scale` times
    data_url(image) -> "data:image/png;base64,..."
During sampling the latent is x_t = (1 - t) x_0 + t noise: early previews are noisy, the last one is close to the
decoded image's colours and layout.
"""

from __future__ import annotations

import base64
import io
import weakref

import numpy as np
import torch
from PIL import Image

from ..sampling.latents import pack
from ..sampling.references import image_to_tensor

FIT_IMAGES = 8  # 8 images x 16 tokens of colour blocks: a first fit, refined by every generated batch
FIT_SIDE = 64  # pixels; 4x4 latent tokens per image
RIDGE = 10.0  # latents are unit-variance; a weak ridge (1e-2) overfits the 8 block images (2x the error)
_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # autoencoder -> LatentPreview (fit once)


def _fit_images(n: int, side: int, cell: int) -> list[Image.Image]:
    """Images made of uniform cell x cell blocks of random colours: each latent token sees one colour."""
    g = np.random.default_rng(0)
    k = side // cell
    return [Image.fromarray(np.kron(g.integers(0, 256, (k, k, 3)), np.ones((cell, cell, 1))).astype(np.uint8))
            for _ in range(n)]  # fmt: skip


def _with_bias(tokens: torch.Tensor) -> torch.Tensor:
    t = tokens.detach().float().cpu()
    return torch.cat([t, torch.ones(t.shape[0], 1)], dim=1)  # (N, 129)


class LatentPreview:
    """Least squares over accumulated normal equations: `observe` adds (token, mean colour) pairs and refits.

    Two sets of normal equations: "prior", the cold-start fit on encoded colour blocks (`fit`), and "outputs", the
    model's own outputs (`observe`); once there are outputs, the map is fitted on them alone."""

    def __init__(self, cell: int, scale: int = 4):
        self.cell, self.scale = cell, scale
        self._eqs = {name: [torch.zeros(129, 129, dtype=torch.float64), torch.zeros(129, 3, dtype=torch.float64)]
                     for name in ("prior", "outputs")}  # fmt: skip
        self.weight = torch.zeros(129, 3)  # 128 channels + bias -> RGB in [-1, 1]

    @classmethod
    @torch.no_grad()
    def fit(cls, ae, scale: int = 4) -> LatentPreview:
        """The preview of `ae`'s latents, fitted once per autoencoder (later calls return the same object)."""
        if ae in _FITTED:
            return _FITTED[ae]
        lp = cls(ae.cfg.downscale, scale)
        device, dtype = next(ae.parameters()).device, next(ae.parameters()).dtype
        for img in _fit_images(FIT_IMAGES, FIT_SIDE, lp.cell):
            z = ae.encode(image_to_tensor(img).to(device, dtype))  # (1, 128, H/16, W/16), normalised
            lp._add("prior", pack(z)[0], [img])
        _FITTED[ae] = lp
        return lp

    def observe(self, tokens: torch.Tensor, images: list[Image.Image]) -> None:
        """tokens (B * L, 128) of the final latents of `images` (B decoded images of one size, row-major tokens)."""
        self._add("outputs", tokens, images)

    def _add(self, name: str, tokens: torch.Tensor, images: list[Image.Image]) -> None:
        x = torch.cat([image_to_tensor(im) for im in images])  # (B, 3, H, W)
        y = pack(torch.nn.functional.avg_pool2d(x, self.cell)).reshape(-1, 3).double()  # (B * L, 3)
        a = _with_bias(tokens).double()
        ata, aty = self._eqs[name]
        ata += a.T @ a
        aty += a.T @ y
        ata, aty = self._eqs["outputs" if self._eqs["outputs"][0].any() else "prior"]
        self.weight = torch.linalg.solve(ata + RIDGE * torch.eye(129, dtype=torch.float64), aty).float()

    def preview(self, tokens: torch.Tensor, h: int, w: int) -> Image.Image:
        """tokens (h * w, 128) -> an RGB image of (w x h) cells, upscaled `scale` times."""
        rgb = _with_bias(tokens) @ self.weight  # (L, 3)
        arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(h, w, 3).numpy()
        return Image.fromarray(arr).resize((w * self.scale, h * self.scale), Image.Resampling.BILINEAR)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
