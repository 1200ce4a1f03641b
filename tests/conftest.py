"""Shared test helpers: tiny random FLUX.2 models and the spec manifests.

Plain functions (import them with `from conftest import tiny_flux2`) plus thin fixtures around them.
Random weights are normal(0, 0.05) so every layer moves the output; norm scales / GroupNorm weights are
1 + normal(0, 0.05) so attention and normalisation stay non-degenerate; VAE BatchNorm statistics are random
(mean normal(0, 0.5), variance uniform [0.5, 2]).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fluxrt.config import TINY, AutoEncoderConfig, TransformerConfig, get_preset
from fluxrt.models.autoencoder import AutoEncoder
from fluxrt.models.transformer import Flux2

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT.parent / "shared" / "spec" / "manifests"  # CI clones ../shared beside the repo

# hidden 64 = 4 heads x 16, RoPE axes (4, 4, 4, 4), 2 double + 2 single blocks, context dim 32.
TINY_TRANSFORMER = TransformerConfig(
    in_channels=128, context_in_dim=32, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2,
    axes_dim=(4, 4, 4, 4), use_guidance_embed=True,
)  # fmt: skip
TINY_AE = AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)


def bench_init_flux2(name: str = "tiny", seed: int = 0) -> Flux2:
    """A preset's transformer with the benchmarks' random init: matrices normal(0, 1/fan_in), norm scales 1
    (fp32, CPU); the fp8 and quantization error tests measure on it."""
    model = Flux2(get_preset(name).transformer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones_like(p) if p.ndim == 1 else torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every floating parameter and buffer in place, deterministically from `seed`."""
    g = torch.Generator().manual_seed(seed)
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g) * std
        if name.endswith(".scale") or (t.ndim == 1 and "norm" in name and name.endswith("weight")):
            noise += 1.0  # RMSNorm scales and GroupNorm weights sit around 1
        if name.endswith("running_mean"):
            noise = torch.randn(t.shape, generator=g) * 0.5
        if name.endswith("running_var"):
            noise = torch.rand(t.shape, generator=g) * 1.5 + 0.5
        t.copy_(noise.to(t.dtype))
    return model


def tiny_flux2(cfg: TransformerConfig = TINY_TRANSFORMER, seed: int = 0) -> Flux2:
    """A Flux2 with random weights (fp32, eval mode)."""
    return randomize_(Flux2(cfg), seed).eval()


def tiny_flow(guidance_embed: bool) -> Flux2:
    """The tiny preset with weights doubled (and random QK-norm scales) so attention mixing is not negligible."""
    torch.manual_seed(1)
    model = Flux2(dataclasses.replace(TINY.transformer, use_guidance_embed=guidance_embed)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p) if name.endswith("scale") else 2 * p)
    return model


def tiny_autoencoder(cfg: AutoEncoderConfig = TINY_AE, seed: int = 0) -> AutoEncoder:
    """An AutoEncoder with random weights and random BatchNorm statistics (fp32, eval mode)."""
    return randomize_(AutoEncoder(cfg), seed).eval()


def load_manifest(name: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of `../shared/spec/manifests/{name}.json`; skips the test if the spec is absent."""
    path = MANIFESTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"spec manifest {path} not found (the repo expects ../shared/spec beside it)")
    return {k: tuple(v) for k, v in json.loads(path.read_text())["tensors"].items()}


def spawn_cpu(n: int, fn, *args, timeout_s: float = 120):
    """fn(*args) on n forked CPU ranks (gloo); rank 0's return value. Each collective is bounded by timeout_s and
    the whole run by 600 s (`spawn`'s deadline_s: a rank stuck outside a collective fails the test, not CI)."""
    from fluxrt.parallel import spawn

    return spawn(n, fn, *args, start_method="fork", timeout_s=timeout_s, deadline_s=600)


def spawn_all(n: int, fn, *args, timeout_s: float = 120) -> list:
    """`spawn_cpu`, with every rank's return value in rank order."""
    return spawn_cpu(n, _gathered, fn, *args, timeout_s=timeout_s)


def _gathered(fn, *args) -> list:
    import torch.distributed as dist

    res = [None] * dist.get_world_size()
    dist.all_gather_object(res, fn(*args))
    return res


def assert_same_state(a: dict, b: dict) -> None:
    """Same keys, shapes, dtypes and bit-identical values."""
    assert sorted(a) == sorted(b)
    for k, t in a.items():
        assert t.dtype == b[k].dtype and t.shape == b[k].shape, k
        assert torch.equal(t.cpu(), b[k].cpu()), k


@pytest.fixture
def flux2_tiny() -> Flux2:
    return tiny_flux2()


@pytest.fixture
def ae_tiny() -> AutoEncoder:
    return tiny_autoencoder()
