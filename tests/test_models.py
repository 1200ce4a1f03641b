"""Model-level checks that need no oracle: attention backends agree, RoPE rotates, dtypes flow."""

import pytest
import torch

from fluxrt.config import TINY, TransformerConfig, get_preset
from fluxrt.models.attention import apply_rope, attention, attention_backend, rope, set_attention_backend
from fluxrt.models.autoencoder import AutoEncoder, patchify, unpatchify
from fluxrt.models.transformer import Flux2
from fluxrt.sampling.latents import grid_ids, text_ids


def test_attention_backends_agree():
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    with attention_backend("math"):
        ref = attention(q, k, v)
    assert ref.shape == (2, 17, 24)
    torch.testing.assert_close(attention(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_unknown_backend_names_the_value():
    with pytest.raises(ValueError, match="nope"):
        set_attention_backend("nope")


def test_rope_is_a_rotation_and_identity_at_origin():
    ids = torch.tensor([[[0, 0, 0, 0], [3, 5, 7, 11]]])
    pe = rope(ids, (4, 4, 4, 4), 2000)
    x = torch.randn(1, 2, 2, 16)
    y = apply_rope(x, pe)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: no rotation
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # rotations keep norms
    assert not torch.allclose(y[:, :, 1], x[:, :, 1])


def test_rope_depends_on_relative_position_only():
    a = torch.tensor([[[0, 1, 2, 0], [0, 4, 6, 0]]])
    pa, pb = rope(a, (4, 4, 4, 4), 2000), rope(a + torch.tensor([0, 3, 5, 0]), (4, 4, 4, 4), 2000)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)
    dot_a = (apply_rope(q, pa)[:, :, 0] * apply_rope(k, pa)[:, :, 1]).sum()
    dot_b = (apply_rope(q, pb)[:, :, 0] * apply_rope(k, pb)[:, :, 1]).sum()
    torch.testing.assert_close(dot_a, dot_b, atol=1e-4, rtol=1e-4)


def test_patchify_round_trip_and_channel_order():
    z = torch.randn(2, 3, 8, 6)
    p = patchify(z)
    assert p.shape == (2, 12, 4, 3)
    assert p[0, 1 * 4 + 1 * 2 + 0, 2, 1] == z[0, 1, 2 * 2 + 1, 1 * 2 + 0]  # channel c*4 + pi*2 + pj
    torch.testing.assert_close(unpatchify(p), z)


def test_bf16_autoencoder_decodes_with_fp32_statistics():
    ae = AutoEncoder(TINY.autoencoder).to(torch.bfloat16)
    ae.bn.float()
    z = ae.encode(torch.rand(1, 3, 64, 64, dtype=torch.bfloat16) * 2 - 1)
    assert z.shape == (1, 128, 4, 4)
    assert ae.decode(z).dtype == torch.bfloat16


def test_guidance_required_for_dev_path():
    m = Flux2(TINY.transformer)
    x, ctx = torch.randn(1, 4, 128), torch.randn(1, 3, TINY.transformer.context_in_dim)
    with pytest.raises(ValueError, match="guidance"):
        m(x, grid_ids(2, 2)[None], torch.tensor([0.5]), ctx, text_ids(3)[None])


def test_config_invariants_name_the_values():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(hidden_size=100, num_heads=3)
    with pytest.raises(KeyError, match="flux.2-nope"):
        get_preset("flux.2-nope")
