"""Sampling without diffusers: schedule worked values, ids, packing, noise, references, Euler and guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_flow
from fluxrt.config import TINY, replace
from fluxrt.models.autoencoder import AutoEncoder
from fluxrt.models.transformer import Flux2
from fluxrt.sampling import latents as L
from fluxrt.sampling import references as R
from fluxrt.sampling.denoise import cfg_velocity, euler, guided_velocity, kv_velocity
from fluxrt.sampling.run import sample
from fluxrt.sampling.schedule import compute_empirical_mu, get_schedule

# ---------------------------------------------------------------- schedule (FLUX2_REFERENCE §7.2 worked values)


@pytest.mark.parametrize(
    "seq_len, steps, mu",
    [(4080, 50, 2.021677), (4096, 50, 2.023351), (4096, 4, 2.291180), (1024, 4, 2.030690), (16384, 50, 3.229986)],
)
def test_empirical_mu_worked_values(seq_len, steps, mu):
    assert compute_empirical_mu(seq_len, steps) == pytest.approx(mu, abs=1e-6)


def test_mu_above_4300_tokens_ignores_step_count():
    assert compute_empirical_mu(4301, 4) == compute_empirical_mu(4301, 50)
    assert compute_empirical_mu(4300, 4) != compute_empirical_mu(4300, 50)


@pytest.mark.parametrize(
    "seq_len, steps, expected",
    [
        (4096, 4, [1.0, 0.967384, 0.908144, 0.767200, 0.0]),  # 1024^2
        (1024, 4, [1.0, 0.958085, 0.883982, 0.717497, 0.0]),  # 512^2
    ],
)
def test_schedule_worked_values(seq_len, steps, expected):
    t = get_schedule(steps, seq_len)
    assert t == pytest.approx(expected, abs=1e-6)
    assert t[0] == 1.0 and t[-1] == 0.0


def test_schedule_1360x768_50_steps():
    t = get_schedule(50, (1360 // 16) * (768 // 16))
    assert len(t) == 51
    assert t[:4] == pytest.approx([1.0, 0.997305, 0.994512, 0.991618], abs=1e-6)
    assert t[-3:] == pytest.approx([0.239326, 0.133525, 0.0], abs=1e-6)
    assert all(a > b for a, b in zip(t, t[1:]))


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="0"):
        get_schedule(0, 4096)


# ---------------------------------------------------------------- ids and packing


def test_grid_ids_layout():
    ids = L.grid_ids(2, 3, t=10)
    expected = [[10, y, x, 0] for y in range(2) for x in range(3)]
    assert ids.dtype == torch.long and ids.tolist() == expected


def test_text_ids_layout():
    assert L.text_ids(4).tolist() == [[0, 0, 0, l] for l in range(4)]


def test_reference_token_ids_and_order():
    a, b = torch.randn(1, 128, 2, 3), torch.randn(1, 128, 1, 2)
    tokens, ids = L.reference_tokens([a, b])
    assert tokens.shape == (1, 8, 128) and ids.shape == (1, 8, 4)
    assert ids[0, :6].tolist() == [[10, y, x, 0] for y in range(2) for x in range(3)]
    assert ids[0, 6:].tolist() == [[20, 0, 0, 0], [20, 0, 1, 0]]
    assert torch.equal(tokens[0, 4], a[0, :, 1, 1]) and torch.equal(tokens[0, 7], b[0, :, 0, 1])


def test_pack_is_row_major_and_unpack_inverts_it():
    z = torch.randn(2, 128, 3, 5)
    tok = L.pack(z)
    assert tok.shape == (2, 15, 128)
    assert torch.equal(tok[1, 2 * 5 + 4], z[1, :, 2, 4])
    assert torch.equal(L.unpack(tok, 3, 5), z)


# ---------------------------------------------------------------- noise


def test_noise_is_per_seed():
    batch = L.noise([7, 11, 13], 3, 4)
    assert batch.shape == (3, 128, 3, 4) and batch.dtype == torch.bfloat16
    assert torch.equal(batch[1], L.noise([11], 3, 4)[0])
    assert torch.equal(batch[2], L.noise([13], 3, 4)[0])
    assert not torch.equal(batch[0], batch[1])
    assert torch.equal(L.noise([5], 2, 2, dtype=torch.float32), L.noise([5], 2, 2, dtype=torch.float32))


# ---------------------------------------------------------------- reference preprocessing


def _rgb(w, h, seed=0, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize(
    "sizes, cap, expected",
    [
        ([(3000, 2000)], "bfl", [(2464, 1648)]),  # one reference: 2024^2 cap -> 2478x1652 -> crop
        ([(1500, 1000)], "bfl", [(1488, 992)]),  # under the single cap: crop only
        ([(1500, 1000)], "diffusers", [(1248, 832)]),  # diffusers caps at 1024^2 -> 1254x836 -> crop
        ([(1500, 1000), (100, 70)], "bfl", [(1248, 832), (96, 64)]),  # several: 1024^2 each, never upscale
        ([(2100, 2100)], "bfl", [(2016, 2016)]),  # 2024x2024 after the cap
        ([(400, 300)], 200 * 150, [(192, 144)]),  # explicit pixel limit -> 200x150 -> crop
    ],
)
def test_reference_sizes(sizes, cap, expected):
    out = R.prepare_references([_rgb(w, h) for w, h in sizes], cap=cap)
    assert [im.size for im in out] == expected


def test_center_crop_offsets():
    img = _rgb(103, 70)
    out = R.center_crop(img)
    assert out.size == (96, 64)
    left, top = (103 - 96) // 2, (70 - 64) // 2
    assert np.array_equal(np.asarray(out), np.asarray(img)[top : top + 64, left : left + 96])


def test_cap_uses_lanczos_and_truncates():
    img = _rgb(300, 200)
    out = R.cap_pixels(img, 150 * 100 + 99)
    s = np.sqrt((150 * 100 + 99) / (300 * 200))
    assert out.size == (int(300 * s), int(200 * s)) == (150, 100)
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((150, 100), Image.Resampling.LANCZOS)))


@pytest.mark.parametrize("size, words", [((63, 100), "63x100"), ((100, 40), "100x40"), ((65, 600), "65x600")])
def test_reference_rejections_name_the_size(size, words):
    with pytest.raises(ValueError, match=words):
        R.prepare_references([_rgb(*size)])


def test_aspect_ratio_8_is_allowed_and_modes_become_rgb():
    out = R.prepare_references([_rgb(64, 512, mode="L"), _rgb(80, 64, mode="RGBA")])
    assert [im.mode for im in out] == ["RGB", "RGB"] and out[0].size == (64, 512)


def test_unknown_cap_is_an_error():
    with pytest.raises(ValueError, match="comfy"):
        R.prepare_references([_rgb(64, 64)], cap="comfy")


def test_image_tensor_conversions():
    img = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    x = R.image_to_tensor(img)
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1])
    y = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 5.0]).view(1, 3, 1, 2)
    out = np.asarray(R.tensor_to_image(y))  # (1, 2, 3)
    assert out.dtype == np.uint8
    assert out.transpose(2, 0, 1).flatten().tolist() == [0, 0, 127, 254, 255, 255]  # truncation, not rounding
    assert len(R.tensor_to_images(torch.zeros(2, 3, 4, 4))) == 2
    with pytest.raises(ValueError, match="batch of 2"):
        R.tensor_to_image(torch.zeros(2, 3, 4, 4))


@pytest.fixture(scope="module")
def tiny_ae():
    torch.manual_seed(0)
    ae = AutoEncoder(TINY.autoencoder).eval()
    ae.bn.running_mean.normal_(0, 0.3)
    ae.bn.running_var.uniform_(0.5, 2.0)
    return ae


def test_encode_references_one_at_a_time(tiny_ae):
    imgs = [_rgb(88, 70, 1), _rgb(67, 100, 2)]
    tokens, ids = R.encode_references(tiny_ae, imgs, dtype=torch.bfloat16)
    assert tokens.shape == (1, 5 * 4 + 4 * 6, 128) and tokens.dtype == torch.bfloat16
    assert ids[0, :20, 0].eq(10).all() and ids[0, 20:, 0].eq(20).all()
    assert ids[0, 19].tolist() == [10, 3, 4, 0] and ids[0, -1].tolist() == [20, 5, 3, 0]
    with torch.no_grad():
        second = tiny_ae.encode(R.image_to_tensor(R.center_crop(imgs[1])))  # (1, 128, 6, 4)
    assert torch.equal(tokens[:, 20:], L.pack(second).to(torch.bfloat16))


# ---------------------------------------------------------------- Euler


def test_euler_recovers_data_from_the_straight_flow():
    """x_t = t noise + (1 - t) data has constant velocity noise - data: Euler is exact on any schedule."""
    noise, data = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    steps = []
    out = euler(lambda x, t, i: noise - data, noise, get_schedule(7, 256), lambda i, x: steps.append(i))
    assert torch.allclose(out, data, atol=1e-12) and steps == list(range(7))


def test_euler_on_linear_velocity_matches_the_product_formula():
    ts = [1.0, 0.8, 0.35, 0.1, 0.0]
    x0 = torch.randn(3, 4, dtype=torch.float64)
    seen = []

    def velocity(x, t, i):
        seen.append((t, i))
        return 0.7 * t * x

    out = euler(velocity, x0, ts)
    factor = np.prod([1 + (b - a) * 0.7 * a for a, b in zip(ts, ts[1:])])
    assert torch.allclose(out, x0 * factor, atol=1e-12)
    assert seen == [(1.0, 0), (0.8, 1), (0.35, 2), (0.1, 3)]


def test_euler_in_bf16_rounds_each_step_like_the_reference():
    x = torch.randn(64, dtype=torch.bfloat16)
    v = torch.randn(64, dtype=torch.bfloat16)
    ts = [1.0, 0.6, 0.0]
    expected = x
    for a, b in zip(ts, ts[1:]):
        expected = expected + ((b - a) * v).to(torch.bfloat16)
    out = euler(lambda y, t, i: v, x, ts)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


# ---------------------------------------------------------------- guidance policies on a tiny model


@pytest.fixture(scope="module")
def klein():
    return tiny_flow(False)


def _inputs(b=2, h=2, w=3, n_txt=8):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(b, h * w, 128, generator=g)
    ctx, neg = torch.randn(b, n_txt, 48, generator=g), torch.randn(b, n_txt, 48, generator=g)
    return img, L.grid_ids(h, w)[None], ctx, neg, L.text_ids(n_txt)[None]


@torch.no_grad()
def test_cfg_batched_forward_equals_two_separate_forwards(klein):
    img, ids, ctx, neg, ctx_ids = _inputs()
    ref, ref_ids = L.reference_tokens([torch.randn(1, 128, 2, 2)])
    cond = guided_velocity(klein, ids, ctx, ctx_ids, ref=ref, ref_ids=ref_ids)(img, 0.6, 0)
    uncond = guided_velocity(klein, ids, neg, ctx_ids, ref=ref, ref_ids=ref_ids)(img, 0.6, 0)
    for s in (1.0, 0.0, 4.0):
        got = cfg_velocity(klein, ids, ctx, neg, ctx_ids, s, ref=ref, ref_ids=ref_ids)(img, 0.6, 0)
        torch.testing.assert_close(got, uncond + s * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-2)


@torch.no_grad()
def test_batched_refs_broadcast_and_each_sample_is_independent(klein):
    img, ids, ctx, _, ctx_ids = _inputs()
    ref, ref_ids = L.reference_tokens([torch.randn(1, 128, 2, 2)])
    both = guided_velocity(klein, ids, ctx, ctx_ids, ref=ref, ref_ids=ref_ids)(img, 0.4, 0)
    one = guided_velocity(klein, ids, ctx[1:], ctx_ids, ref=ref, ref_ids=ref_ids)(img[1:], 0.4, 0)
    plain = guided_velocity(klein, ids, ctx[1:], ctx_ids)(img[1:], 0.4, 0)
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one, plain, atol=1e-2)  # the reference tokens take part


@torch.no_grad()
def test_kv_cached_step_equals_extract_step_at_same_input(klein):
    """Reference K/V depend on the references only, so a cached step at the step-0 input repeats step 0."""
    img, ids, ctx, _, ctx_ids = _inputs()
    ref, ref_ids = L.reference_tokens([torch.randn(1, 128, 2, 2), torch.randn(1, 128, 1, 3)])
    v = kv_velocity(klein, ids, ctx, ctx_ids, ref, ref_ids)
    step0 = v(img, 0.7, 0)
    torch.testing.assert_close(v(img, 0.7, 1), step0, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v(img, 0.3, 2), step0, atol=1e-2)


@torch.no_grad()
def test_kv_reference_cache_ignores_text_time_and_image(klein):
    """References attend only to themselves and are modulated at t = 0: their K/V are the same for any input."""
    img, ids, ctx, neg, ctx_ids = _inputs()
    ref, ref_ids = L.reference_tokens([torch.randn(1, 128, 2, 2)])
    _, kv_a = klein.forward_kv_extract(img, ids, ref.expand(2, -1, -1), ref_ids, torch.full((2,), 0.9), ctx, ctx_ids)
    _, kv_b = klein.forward_kv_extract(-img, ids, ref.expand(2, -1, -1), ref_ids, torch.full((2,), 0.2), neg, ctx_ids)
    assert len(kv_a.kv) == 4
    for blk in kv_a.kv:
        for a, b in zip(kv_a.kv[blk], kv_b.kv[blk]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_kv_step0_differs_from_plain_refs(klein):
    """The KV model's step 0 (t = 0 refs, one-way attention) is not the plain forward with appended refs."""
    img, ids, ctx, _, ctx_ids = _inputs()
    ref, ref_ids = L.reference_tokens([torch.randn(1, 128, 2, 2)])
    kv = kv_velocity(klein, ids, ctx, ctx_ids, ref, ref_ids)(img, 0.7, 0)
    plain = guided_velocity(klein, ids, ctx, ctx_ids, ref=ref, ref_ids=ref_ids)(img, 0.7, 0)
    assert not torch.allclose(kv, plain, atol=1e-2)


@torch.no_grad()
def test_sample_modes_run_and_match_manual_euler():
    dev = tiny_flow(True)
    g = torch.Generator().manual_seed(4)
    noise, ctx = torch.randn(1, 128, 2, 3, generator=g), torch.randn(1, 8, 48, generator=g)
    out = sample(dev, noise, ctx, num_steps=3, mode="embedded", guidance=3.5)
    ts = get_schedule(3, 6)
    v = guided_velocity(dev, L.grid_ids(2, 3)[None], ctx, L.text_ids(8)[None], guidance=3.5)
    torch.testing.assert_close(out, L.unpack(euler(v, L.pack(noise), ts), 2, 3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="neg_ctx"):
        sample(dev, noise, ctx, num_steps=1, mode="cfg")
    with pytest.raises(ValueError, match="'turbo'"):
        sample(dev, noise, ctx, num_steps=1, mode="turbo")
