"""Reference images: validation, pixel cap, centre crop, tensor conversion and per-image encoding.

Contract (the reference `encode_image_refs` / `default_prep`, in order, per image):
    RGB -> reject sides < 64 or aspect ratio > 8 -> cap the pixel count (LANCZOS, truncated sizes, never
    upscale) -> centre crop both sides down to a multiple of 16 -> 2 x ToTensor - 1 -> encode alone.
`encode_references(ae, images, ...)` returns tokens (1, sum L_i, 128) and ids (1, sum L_i, 4) with reference i
at t = 10 + 10 i. `tensor_to_image` turns a decoded (3, H, W) tensor in about [-1, 1] into a uint8 PIL image.

Pixel caps: "bfl" (the reference) allows 2024^2 pixels for a single reference and 1024^2 each for several;
"diffusers" (0.42.1 pipelines) resizes anything over 1024^2 down to 1024^2, whatever the count; an int is
a fixed limit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .latents import reference_tokens

MIN_SIDE = 64  # smaller references are rejected, not upscaled
MAX_ASPECT = 8
SINGLE_CAP = 2024**2  # the reference's single-image limit is 2024^2 (not 2048^2)
MULTI_CAP = 1024**2  # per image when there are several
MULTIPLE = 16  # one latent token covers 16x16 pixels


def pixel_cap(n_refs: int, cap: str | int = "bfl") -> int:
    """Largest pixel count allowed for each of `n_refs` references under policy `cap`."""
    if isinstance(cap, int):
        return cap
    if cap == "bfl":
        return SINGLE_CAP if n_refs == 1 else MULTI_CAP
    if cap == "diffusers":
        return MULTI_CAP
    raise ValueError(f"unknown reference cap {cap!r}: use 'bfl', 'diffusers' or a pixel count")


def check_reference(img: Image.Image) -> None:
    """Raise ValueError, naming the size, if a side is under 64 px or the aspect ratio exceeds 8."""
    w, h = img.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ValueError(f"reference image {w}x{h} is too small: both sides must be at least {MIN_SIDE} px")
    if w > MAX_ASPECT * h or h > MAX_ASPECT * w:
        raise ValueError(f"reference image {w}x{h} has an aspect ratio above {MAX_ASPECT}:1")


def cap_pixels(img: Image.Image, limit: int) -> Image.Image:
    """Downscale with LANCZOS to about `limit` pixels (sizes truncated) if larger; never upscale."""
    w, h = img.size
    if w * h <= limit:
        return img
    s = math.sqrt(limit / (w * h))
    return img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)


def center_crop(img: Image.Image, multiple: int = MULTIPLE) -> Image.Image:
    """Crop both sides down to a multiple of `multiple`, centred (left = (w - new_w) // 2)."""
    w, h = img.size
    new_w, new_h = w // multiple * multiple, h // multiple * multiple
    left, top = (w - new_w) // 2, (h - new_h) // 2
    return img.crop((left, top, left + new_w, top + new_h))


def prepare_references(images: list[Image.Image], cap: str | int = "bfl", multiple: int = MULTIPLE):
    """Validate, cap and crop each image (converted to RGB first); returns new PIL images in input order."""
    if not images:
        return []
    limit = pixel_cap(len(images), cap)
    out = []
    for img in images:
        img = img.convert("RGB")
        check_reference(img)
        out.append(center_crop(cap_pixels(img, limit), multiple))
    return out


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) fp32 in [-1, 1] (2 x ToTensor - 1)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) decoded image -> uint8 PIL: clamp to [-1, 1], trunc(127.5 (x + 1))."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"tensor_to_image takes one image, got a batch of {x.shape[0]}: use tensor_to_images")
        x = x[0]
    x = x.detach().float().clamp(-1, 1)
    return Image.fromarray((127.5 * (x + 1.0)).permute(1, 2, 0).to(torch.uint8).cpu().numpy())


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) decoded images -> B uint8 PIL images."""
    return [tensor_to_image(xi) for xi in x]


@torch.no_grad()
def encode_references(ae, images: list[Image.Image], device=None, dtype=torch.bfloat16, cap: str | int = "bfl"):
    """Preprocess and encode references one at a time at their own size.

    ae: an `AutoEncoder` (runs in its own parameter dtype); images: PIL images in order.
    Returns tokens (1, sum L_i, 128) in `dtype` and int64 ids (1, sum L_i, 4), on `device`.
    """
    if not images:
        raise ValueError("encode_references needs at least one image")
    device = device if device is not None else next(ae.parameters()).device
    ae_dtype = next(ae.parameters()).dtype
    latents = []
    for img in prepare_references(images, cap, ae.cfg.downscale):
        latents.append(ae.encode(image_to_tensor(img).to(device, ae_dtype)))  # (1, 128, h_i, w_i)
    tokens, ids = reference_tokens(latents)
    return tokens.to(dtype), ids
