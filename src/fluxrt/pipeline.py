"""The generation pipeline: owns the components and runs encode -> prepare -> denoise -> decode.

Stage boundaries are tensors: prompt features (B, T, C), packed latent tokens (B, L, 128) with ids (B, L, 4),
reference tokens (1, L_ref, 128) per sample, decoded images (B, 3, H, W). Each component may sit on its own
device. Samples whose references have the same layout are batched together; others run in their own batch,
so every sample keeps its own references and position ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from .config import ModelSpec
from .models.autoencoder import AutoEncoder
from .models.transformer import Flux2
from .sampling.denoise import cfg_velocity, euler, guided_velocity, kv_velocity
from .sampling.latents import grid_ids, noise, pack, text_ids, unpack
from .sampling.references import encode_references, tensor_to_images
from .sampling.schedule import get_schedule


@dataclass
class Sample:
    """One output image's inputs."""

    prompt: str
    seed: int
    refs: list[Image.Image] = field(default_factory=list)


class Pipeline:
    def __init__(self, spec: ModelSpec, transformer: Flux2, ae: AutoEncoder, text_encoder, dtype=torch.bfloat16):
        self.spec, self.transformer, self.ae, self.text_encoder, self.dtype = spec, transformer, ae, text_encoder, dtype
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, T, C) prompt features on the transformer's device; a repeated prompt is never re-encoded."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if todo:
            for p, f in zip(todo, self.text_encoder.encode(todo)):
                self._prompt_cache[p] = f.detach().to("cpu")
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.device, self.dtype)

    def _references(self, samples: list[Sample]):
        """Per-sample reference tokens stacked to (B, L_ref, 128) with shared ids, or (None, None)."""
        if not samples[0].refs:
            return None, None
        enc = [encode_references(self.ae, s.refs, self.device, self.dtype) for s in samples]
        return torch.cat([t for t, _ in enc]), enc[0][1]

    def _velocity(self, img_ids, ctx, ctx_ids, guidance: float, ref, ref_ids):
        mode, model = self.spec.guidance_mode, self.transformer
        if self.spec.use_kv_cache and ref is not None:
            return kv_velocity(model, img_ids, ctx, ctx_ids, ref, ref_ids)
        if mode == "cfg":
            neg = self.encode_prompts([""] * ctx.shape[0])
            return cfg_velocity(model, img_ids, ctx, neg, ctx_ids, guidance, ref, ref_ids)
        return guided_velocity(model, img_ids, ctx, ctx_ids, guidance if mode == "embedded" else None, ref, ref_ids)

    @torch.no_grad()
    def denoise(self, samples: list[Sample], width: int, height: int, steps: int, guidance: float,
                callback: Callable | None = None) -> torch.Tensor:  # fmt: skip
        """Samples sharing one reference layout -> (B, L, 128) denoised tokens."""
        h, w = height // 16, width // 16
        ctx = self.encode_prompts([s.prompt for s in samples])
        ctx_ids = text_ids(ctx.shape[1], self.device)[None]
        img = pack(noise([s.seed for s in samples], h, w, device=self.device, dtype=self.dtype))
        ref, ref_ids = self._references(samples)
        velocity = self._velocity(grid_ids(h, w, 0, self.device)[None], ctx, ctx_ids, guidance, ref, ref_ids)
        return euler(velocity, img, get_schedule(steps, h * w), callback)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        ae_param = next(self.ae.parameters())
        z = unpack(tokens, height // 16, width // 16).to(ae_param.device, ae_param.dtype)
        return tensor_to_images(self.ae.decode(z))

    def generate(self, samples: list[Sample], width: int, height: int, steps: int, guidance: float,
                 callback: Callable | None = None, max_batch: int = 8) -> list[Image.Image]:  # fmt: skip
        """Images in the order of `samples`; samples are batched by reference layout, `max_batch` at a time."""
        out: list[Image.Image | None] = [None] * len(samples)
        for idx in _batches(samples, max_batch):
            group = [samples[i] for i in idx]
            tokens = self.denoise(group, width, height, steps, guidance, callback)
            for i, im in zip(idx, self.decode(tokens, width, height)):
                out[i] = im
        return out


def _layout(s: Sample) -> tuple:
    return tuple(im.size for im in s.refs)


def _batches(samples: list[Sample], max_batch: int) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(_layout(s), []).append(i)
    return [g[k : k + max_batch] for g in groups.values() for k in range(0, len(g), max_batch)]
