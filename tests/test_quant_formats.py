"""fluxrt.quant formats: NF4 (against bitsandbytes), int4 (against torch's int4 kernel), GGUF blocks (against the
gguf package's numpy dequantisers), and `quantize(model, scheme)` on the tiny transformer and on text encoders.

Measured on a CPU (torch 2.13, fp32): Gaussian weights round-trip with relative L2 errors of 0.092 (NF4, block
64), 0.099 (int4, group 128, row scales spread 0.1-3), 0.0054 (Q8_0), 0.078 (Q4_K), 0.038 (Q5_K), 0.019 (Q6_K);
the bounds below sit above them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import bench_init_flux2

from fluxrt.quant import (
    DEFAULT_SKIP,
    SCHEMES,
    Fp8Linear,
    Int4Linear,
    Nf4Linear,
    default_skip,
    quantize,
    quantized_layers,
)
from fluxrt.quant import gguf as G
from fluxrt.quant.fp8 import fp8_linears, quantize_transformer
from fluxrt.quant.int4 import dequantize_int4, quantize_int4
from fluxrt.quant.nf4 import NF4_CODE, bnb_absmax, code_tensor, dequantize_nf4, quantize_nf4
from fluxrt.sampling.latents import grid_ids, text_ids


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gaussian(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ NF4
def test_nf4_round_trip_is_nearest_code_per_block():
    w = gaussian(96, 256)
    w[3, :64] = 0  # an all-zero block
    packed, absmax = quantize_nf4(w)
    assert packed.shape == (96, 128) and packed.dtype == torch.uint8 and absmax.shape == (96, 4)
    back = dequantize_nf4(packed, absmax, code_tensor("nf4", "cpu"))
    assert torch.equal(back[3, :64], torch.zeros(64))
    code = torch.tensor(NF4_CODE)
    scaled = (w.reshape(96, 4, 64) / absmax[..., None]).reshape(96, 256)
    best = (scaled[..., None] - code).abs().amin(-1)  # distance to the nearest code
    got = ((back - w).reshape(96, 4, 64) / absmax[..., None]).reshape(96, 256).abs()
    assert torch.allclose(got, best, atol=1e-6)  # every value took its nearest code
    rel = rel_l2(back, w)
    print(f"NF4 round trip on Gaussian weights: rel L2 {rel:.4f}")
    assert 0.05 < rel < 0.11


def test_nf4_matches_bitsandbytes_bytes_and_double_quant():
    F = pytest.importorskip("bitsandbytes.functional")
    w = gaussian(128, 320, seed=1)
    packed, absmax = quantize_nf4(w)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.reshape(128, 160), packed)  # same codes, same nibble order
    assert torch.equal(state.absmax.reshape(128, 5), absmax)
    assert torch.allclose(state.code, code_tensor("nf4", "cpu"))
    # double quantization (bnb's compress_statistics): our expansion of the nested absmax equals bnb's
    q2, st2 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    parts = {k: v for k, v in st2.as_dict(packed=True).items() if not k.startswith("quant_state")}
    state_json = {"nested_blocksize": 256, "nested_offset": st2.offset.item()}
    ours = dequantize_nf4(
        q2.reshape(128, 160), bnb_absmax(parts, state_json).reshape(128, 5), code_tensor("nf4", "cpu")
    )
    assert torch.allclose(ours, F.dequantize_4bit(q2, st2), atol=1e-6)


def test_nf4_linear_forward_and_dtype_cast():
    lin = nn.Linear(128, 48, bias=True)
    q = Nf4Linear.from_linear(lin)
    x = torch.randn(2, 5, 128)
    assert torch.allclose(q(x), nn.functional.linear(x, q.dequantized(), lin.bias), atol=1e-5)
    assert rel_l2(q(x), lin(x)) < 0.12 and q.impl == "reference"
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.uint8 and q.weight_absmax.dtype == torch.float32
    assert q(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of the block size 64"):
        Nf4Linear.from_linear(nn.Linear(96, 8))


# ----------------------------------------------------------------------------------------------------- int4
def test_int4_round_trip_bound():
    w = gaussian(64, 512) * torch.linspace(0.1, 3, 64)[:, None]
    packed, scale, zero = quantize_int4(w)
    assert packed.shape == (64, 256) and scale.shape == zero.shape == (64, 4) and scale.dtype == torch.bfloat16
    back = dequantize_int4(packed, scale, zero)
    err = (back - w).reshape(64, 4, 128).abs().amax(-1)
    # half a step, plus what rounding the group's zero to bf16 can push past the ends of the code range
    assert (err <= 0.5 * scale.float() + 2**-8 * zero.float().abs() + 1e-6).all()
    rel = rel_l2(back, w[:, :].clone())
    print(f"int4 (group 128) round trip on Gaussian weights: rel L2 {rel:.4f}")
    assert 0.05 < rel < 0.11


def test_int4_matches_torch_int4pack_kernel_convention():
    """torch's CPU int4 kernel computes x @ ((q - 8) * scale + zero)^T: the same weight as our reference path."""
    kernel = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if kernel is None:
        pytest.skip("this torch has no CPU int4pack kernel")
    lin = nn.Linear(256, 64, bias=False)
    q = Int4Linear.from_linear(lin)
    codes = torch.stack([q.weight >> 4, q.weight & 15], -1).reshape(64, 256).int()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    sz = torch.stack([q.weight_scale.t(), q.weight_zero.t()], -1).contiguous()
    x = torch.randn(8, 256).bfloat16()
    y = kernel(x, packed, 128, sz)
    assert rel_l2(y, q(x.float())) < 5e-3  # bf16 activations and output only


# ----------------------------------------------------------------------------------------------------- GGUF
def _random_blocks(qtype: int, rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random bytes in `qtype`'s block layout, with finite, moderate fp16 scale fields."""
    per, size = G.BLOCKS[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows * k // per, size), dtype=torch.uint8, generator=g)
    d = (torch.rand(rows * k // per, 2, generator=g) * 0.02 + 0.001).half().view(torch.uint8)  # (B, 4) bytes
    offsets = {G.Q6_K: (208,), G.Q4_K: (0, 2), G.Q5_K: (0, 2), G.Q4_1: (0, 2), G.Q5_1: (0, 2)}.get(qtype, (0,))
    for i, off in enumerate(offsets):
        raw[:, off : off + 2] = d[:, 2 * i : 2 * i + 2]
    return raw.reshape(rows, k // per * size)


@pytest.mark.parametrize("qtype", sorted(G.BLOCKS), ids=lambda t: G.type_name(t))
def test_gguf_torch_dequantizers_equal_the_gguf_package(qtype):
    gguf = pytest.importorskip("gguf")
    raw = _random_blocks(qtype, 6, 512)
    ours = G.dequantize_blocks(raw, qtype, 512)
    ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(qtype)).reshape(6, 512)
    assert ours.shape == (6, 512) and torch.isfinite(ours).all()
    np.testing.assert_array_equal(ours.numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("qtype, bound", [(G.Q8_0, 0.008), (G.Q6_K, 0.025), (G.Q5_K, 0.05), (G.Q4_K, 0.1)],
                         ids=["Q8_0", "Q6_K", "Q5_K", "Q4_K"])  # fmt: skip
def test_gguf_quantizers_round_trip(qtype, bound):
    w = gaussian(8, 1024, seed=qtype)
    raw = G.quantize_blocks(w, qtype)
    rel = rel_l2(G.dequantize_blocks(raw, qtype, 1024), w)
    print(f"GGUF {G.type_name(qtype)} round trip on Gaussian weights: rel L2 {rel:.4f}")
    assert rel < bound and rel > bound / 20


def test_gguf_linear_forward():
    lin = nn.Linear(256, 32, bias=False)
    layer = G.GgufLinear(256, 32, G.Q6_K)
    layer.weight = G.quantize_blocks(lin.weight.detach(), G.Q6_K)
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x), x @ layer.dequantized().t(), atol=1e-5) and rel_l2(layer(x), lin(x)) < 0.03
    with pytest.raises(ValueError, match="Q2_K"):
        G.GgufLinear(256, 32, G.Q2_K)


# ---------------------------------------------------------------------------------------- quantize(model, ...)
def tiny_inputs(cfg, times=(0.1, 0.5, 0.9), side: int = 8, n_txt: int = 16, seed: int = 1):
    g, b = torch.Generator().manual_seed(seed), len(times)
    x = torch.randn(1, side * side, cfg.in_channels, generator=g).expand(b, -1, -1)
    ctx = torch.randn(1, n_txt, cfg.context_in_dim, generator=g).expand(b, -1, -1)
    return x, grid_ids(side, side)[None], torch.tensor(times), ctx, text_ids(n_txt)[None], torch.full((b,), 4.0)


# tiny preset, measured: fp8 0.030-0.036, nf4 0.083-0.092, int4 0.085-0.086 (group 64: tiny's K is 64)
VELOCITY_BOUND = {"fp8": 0.045, "nf4": 0.16, "int4": 0.14}
LAYER_TYPE = {"fp8": Fp8Linear, "nf4": Nf4Linear, "int4": Int4Linear}


@pytest.mark.parametrize("scheme", SCHEMES)
@torch.no_grad()
def test_quantize_tiny_transformer(scheme):
    model = bench_init_flux2()
    inp = tiny_inputs(model.cfg)
    exact = model(*inp)
    quant = quantize(copy.deepcopy(model), scheme, DEFAULT_SKIP)  # every block Linear
    layers = quantized_layers(quant)
    assert len(layers) == 2 * 8 + 2 * 2 and set(layers.values()) == {scheme}
    assert all(isinstance(quant.get_submodule(n), LAYER_TYPE[scheme]) for n in layers)
    assert type(quant.final_layer.adaLN_modulation[1]) is nn.Linear and type(quant.img_in) is nn.Linear
    v = quant(*inp)
    rel = ((v - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).tolist()
    print(f"tiny preset {scheme} velocity rel L2 at t=0.1, 0.5, 0.9: {', '.join(f'{r:.4f}' for r in rel)}")
    assert 0.005 < min(rel) and max(rel) < VELOCITY_BOUND[scheme]


def test_default_skip_per_scheme():
    assert default_skip("nf4") == default_skip("int4") == DEFAULT_SKIP
    assert set(DEFAULT_SKIP) <= set(default_skip("fp8"))  # fp8 may keep more (its MLP products), never less
    ours = quantized_layers(quantize(bench_init_flux2(), "fp8"))
    assert sorted(ours) == sorted(fp8_linears(quantize_transformer(bench_init_flux2())))  # fp8.py's own default
    assert "double_blocks.0.img_attn.qkv" in ours


def test_quantize_rejects_unknown_scheme_and_honours_skip():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int8'"):
        quantize(nn.Sequential(nn.Linear(64, 64)), "int8")
    quant = quantize(bench_init_flux2(), "nf4", skip=("single_blocks", "img_in"))
    names = quantized_layers(quant)
    assert not any(n.startswith(("single_blocks.", "img_in")) for n in names)
    assert "time_in.in_layer" in names and "final_layer.adaLN_modulation.1" in names  # no longer skipped
    assert type(quant.txt_in) is nn.Linear  # not skipped, but K = 48 does not fit NF4's block of 64: kept


def _tiny_lm(family: str):
    """A random 2-layer `{family}ForCausalLM` (Qwen3 or Mistral) whose linears all fit the 4-bit blocks."""
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, f"{family}Config")(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("family", ["Qwen3", "Mistral"])
@pytest.mark.parametrize("scheme", SCHEMES)
@torch.no_grad()
def test_quantize_text_encoder(family, scheme):
    model = _tiny_lm(family)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    exact = model(ids, output_hidden_states=True).hidden_states
    quant = quantize(copy.deepcopy(model), scheme)
    layers = quantized_layers(quant)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per decoder layer
    assert type(quant.lm_head) is nn.Linear and type(quant.model.embed_tokens) is nn.Embedding
    hidden = quant(ids, output_hidden_states=True).hidden_states
    rel = rel_l2(hidden[2], exact[2])
    print(f"{family} {scheme}: layer-2 hidden state rel L2 {rel:.4f}")
    assert torch.equal(hidden[0], exact[0]) and 1e-3 < rel < 0.2


# --------------------------------------------------------------------------------------------- kernel paths
def test_nf4_bnb_impl_equals_reference_on_cpu():
    """The bitsandbytes call the CUDA path makes (QuantState built from our buffers), run on bnb's CPU backend."""
    pytest.importorskip("bitsandbytes")
    q = Nf4Linear.from_linear(nn.Linear(256, 96, bias=False))
    x = torch.randn(4, 7, 256)
    ref = q(x)
    q.impl = "bnb"
    assert torch.allclose(q(x), ref, atol=1e-4, rtol=1e-4)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@torch.no_grad()
def test_gpu_int4_tinygemm_and_nf4_paths_match_reference():
    for scheme, cls in (("int4", Int4Linear), ("nf4", Nf4Linear)):
        lin = nn.Linear(3072, 9216, bias=False).cuda()
        q = cls.from_linear(lin)
        x = torch.randn(300, 3072, device="cuda", dtype=torch.bfloat16)
        fast = q(x)
        impl, q.impl = q.impl, "reference"
        ref = q(x)
        rel = rel_l2(fast, ref)
        print(f"{scheme} {impl} vs reference on {torch.cuda.get_device_name()}: rel L2 {rel:.2e}")
        assert fast.dtype == torch.bfloat16 and rel < 1e-2
        if scheme == "int4":
            assert impl == "tinygemm"
