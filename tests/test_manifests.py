"""Presets build exactly the official tensor names and shapes (spec manifests), and so do our key maps.

Everything is built on the meta device, so the 32B model costs nothing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_manifest

from fluxrt.config import get_preset
from fluxrt.loading import keymaps
from fluxrt.models.autoencoder import AutoEncoder
from fluxrt.models.transformer import Flux2

VARIANTS = [  # preset, BFL manifest, diffusers manifest, parameters (FLUX2_REFERENCE §2.1)
    ("flux.2-dev", "flux2-dev", "diffusers-flux2-dev-transformer", 32_223_281_152),
    ("flux.2-klein-4b", "flux2-klein-4b", "diffusers-flux2-klein-4b-transformer", 3_875_544_576),
    ("flux.2-klein-9b", "flux2-klein-9b", "diffusers-flux2-klein-9b-transformer", 9_078_581_248),
]


def meta_model(preset: str):
    with torch.device("meta"):
        return Flux2(get_preset(preset).transformer)


def shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_same_shapes(got: dict, want: dict) -> None:
    assert sorted(set(want) - set(got)) == [], "missing"
    assert sorted(set(got) - set(want)) == [], "unexpected"
    assert {k: v for k, v in got.items() if want[k] != v} == {}, "shape mismatch"


@pytest.mark.parametrize("preset, bfl, _diffusers, params", VARIANTS)
def test_transformer_preset_matches_bfl_manifest(preset, bfl, _diffusers, params):
    model = meta_model(preset)
    assert sum(p.numel() for p in model.parameters()) == params
    assert list(model.buffers()) == []
    assert_same_shapes(shapes(model.state_dict()), load_manifest(bfl))


@pytest.mark.parametrize("preset, _bfl, diffusers, params", VARIANTS)
def test_keymap_gives_diffusers_manifest(preset, _bfl, diffusers, params):
    converted = keymaps.transformer_bfl_to_diffusers(dict(meta_model(preset).state_dict()))
    assert_same_shapes(shapes(converted), load_manifest(diffusers))
    assert sum(t.numel() for t in converted.values()) == params
    back = keymaps.transformer_diffusers_to_bfl(converted)
    assert_same_shapes(shapes(back), load_manifest(_bfl))


def test_autoencoder_matches_ae_manifest_and_diffusers_vae():
    with torch.device("meta"):
        ae = AutoEncoder(get_preset("flux.2-dev").autoencoder)
    sd = dict(ae.state_dict())
    assert_same_shapes(shapes(sd), load_manifest("flux2-ae"))
    assert sum(t.numel() for t in sd.values() if t.is_floating_point()) == 84_046_371  # incl. 256 BN stats
    assert sum(p.numel() for p in ae.parameters()) == 84_046_115
    converted = keymaps.vae_bfl_to_diffusers(sd)
    assert_same_shapes(shapes(converted), load_manifest("diffusers-flux2-vae"))
    assert_same_shapes(shapes(keymaps.vae_diffusers_to_bfl(converted)), load_manifest("flux2-ae"))


def test_every_preset_shares_the_official_ae():
    official = get_preset("flux.2-dev").autoencoder
    for name in ("flux.2-klein-4b", "flux.2-klein-9b", "flux.2-klein-9b-kv", "flux.2-klein-base-4b"):
        assert get_preset(name).autoencoder == official
