"""fluxrt.quant.fp8: rowwise e4m3 rounding bounds, the Fp8Linear oracle, and the quantized tiny transformer.

Measured on a CPU (torch 2.13, fp32 reference path): one W8A8 matmul on Gaussian data is off by 3.7% (relative
L2), weight-only rounding by 2.6%, which is e4m3's 3 mantissa bits, not the code. The tiny preset with the
benchmark's random init (std 1/sqrt(fan_in), norm scales 1), velocity error over t = 0.1, 0.5, 0.9: the default
layer choice (FP8_SKIP: attention-side products in fp8, MLP products not) 1.7-2.0%, every block Linear in fp8
(DEFAULT_SKIP) 3.0-3.6%; the bounds below leave a margin over those numbers. Full-size numbers (not tests; bench/
fp8_error.py, bench/RESULTS.md "fp8 error"): klein-4B at 1024², FP8_SKIP 2.6-2.7% emulated, 2.9% with the real
scaled_mm layers on an H100 against the bf16 model, 50% of the step's FLOPs in fp8; every block Linear 3.8-4.0%.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import bench_init_flux2

from fluxrt.quant.fp8 import (
    DEFAULT_SKIP,
    E4M3,
    E4M3_MAX,
    FP8_SKIP,
    Fp8Linear,
    dequantize_rowwise,
    fp8_linears,
    fp8_matmul_reference,
    fp8_matmul_scaled_mm,
    quantize_rowwise,
    quantize_transformer,
    skipped,
)  # fmt: skip
from fluxrt.sampling.latents import grid_ids, text_ids

HALF_ULP = 2.0**-4  # e4m3: 3 mantissa bits, spacing 2^-3 relative to the leading bit, round to nearest
SUBNORMAL_HALF_STEP = 2.0**-10  # smallest e4m3 spacing is 2^-9 (below 2^-6), in units of the row scale
MATMUL_REL_L2 = 0.045  # one W8A8 product vs fp32 (measured 0.037)
VELOCITY_REL_L2 = 0.03  # tiny preset, default layers, vs the unquantized model (measured 0.017-0.020)
VELOCITY_ALL_REL_L2 = 0.045  # tiny preset, every block Linear in fp8 (measured 0.030-0.036)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def wide_rows(seed: int = 0) -> torch.Tensor:
    """(64, 256) values spanning ~12 orders of magnitude per row, random signs, one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g) * torch.exp(torch.empty(64, 256).uniform_(-14, 14, generator=g))
    x *= torch.exp(torch.empty(64, 1).uniform_(-20, 20, generator=g))  # per-row scale
    x[7] = 0
    return x


def test_e4m3_format_facts():
    assert E4M3_MAX == 448.0 and torch.finfo(E4M3).eps == 2 * HALF_ULP
    assert torch.finfo(E4M3).smallest_normal == 2.0**-6


def test_round_trip_error_bound_is_tight():
    x = wide_rows()
    q, scale = quantize_rowwise(x)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == (64,) and scale.dtype == torch.float32
    back = dequantize_rowwise(q, scale)
    err = (back - x).abs()
    bound = torch.maximum(HALF_ULP * x.abs(), SUBNORMAL_HALF_STEP * scale[:, None]) * (1 + 1e-6)
    assert torch.isfinite(back).all() and (err <= bound).all()
    normal = x.abs() >= 2.0**-6 * scale[:, None]
    rel = err[normal] / x.abs()[normal]
    print(f"e4m3 round trip: max rel error {rel.max():.4f} (bound {HALF_ULP}), rms {rel.pow(2).mean().sqrt():.4f}")
    assert rel.max() > 0.9 * HALF_ULP  # the bound is reached: it is the real one, not a loose one
    amax_pos = x.abs().argmax(-1, keepdim=True)
    assert (q.float().abs().gather(-1, amax_pos)[torch.arange(64) != 7] == E4M3_MAX).all()  # amax lands on 448
    assert (q[7].float() == 0).all() and (back[7] == 0).all()


def test_fp8_linear_reference_vs_fp32_linear():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(512, 384, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 512, generator=g) / 512**0.5)
    x = torch.randn(3, 50, 512, generator=g)
    q = Fp8Linear.from_linear(lin)
    assert q.impl == "reference" and q.weight.dtype == E4M3 and q.weight_scale.shape == (384,)
    y, yq = lin(x), q(x)
    rel = ((yq - y).norm() / y.norm()).item()
    print(f"Fp8Linear (reference) vs fp32 Linear: rel L2 {rel:.4f}")
    assert yq.shape == y.shape == (3, 50, 384) and yq.dtype == x.dtype
    assert 0.01 < rel < MATMUL_REL_L2  # it does quantize, and no worse than e4m3 must be


def test_fp8_linear_rejects_bad_dims_and_impls():
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear.from_linear(nn.Linear(24, 32, bias=False))
    with pytest.raises(ValueError, match="impl"):
        Fp8Linear(32, 32, impl="cublas")
    with pytest.raises(ValueError, match="unknown fp8 impl"):
        quantize_transformer(nn.Sequential(nn.Linear(32, 32)), impl="fast")


def tiny_inputs(cfg, refs: int, times=(0.1, 0.5, 0.9), side: int = 8, n_txt: int = 16, seed: int = 1):
    """One sample per time t (the error depends on t through the modulations), same image and text."""
    g, b = torch.Generator().manual_seed(seed), len(times)
    ids = torch.cat([grid_ids(side, side)] + [grid_ids(side, side, 10 * (i + 1)) for i in range(refs)])[None]
    x = torch.randn(1, ids.shape[1], cfg.in_channels, generator=g).expand(b, -1, -1)
    ctx = torch.randn(1, n_txt, cfg.context_in_dim, generator=g).expand(b, -1, -1)
    return x, ids, torch.tensor(times), ctx, text_ids(n_txt)[None], torch.full((b,), 4.0)


def velocity_errors(model, skip, inp) -> list[float]:
    """Relative L2 error of the quantized copy's velocity, per sample (per t)."""
    exact = model(*inp)
    v = quantize_transformer(copy.deepcopy(model), skip)(*inp)
    return ((v - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).tolist()


@pytest.mark.parametrize("refs", [0, 1])
@torch.no_grad()
def test_quantized_tiny_transformer_velocity_error(refs):
    model = bench_init_flux2()
    inp = tiny_inputs(model.cfg, refs)
    rel, rel_all = velocity_errors(model, FP8_SKIP, inp), velocity_errors(model, DEFAULT_SKIP, inp)
    print(f"tiny fp8 velocity rel L2 (refs={refs}) at t=0.1, 0.5, 0.9: default {', '.join(f'{r:.4f}' for r in rel)}; "
          f"every block Linear {', '.join(f'{r:.4f}' for r in rel_all)}")  # fmt: skip
    assert 0.005 < min(rel) and max(rel) < VELOCITY_REL_L2 and max(rel_all) < VELOCITY_ALL_REL_L2
    assert all(a < 0.7 * b for a, b in zip(rel, rel_all))  # keeping the MLP products is what buys the accuracy


@torch.no_grad()
def test_default_layer_choice():
    """fp8: the double blocks' qkv and proj (both streams) and the single blocks' linear1; nothing else."""
    quant = quantize_transformer(bench_init_flux2())
    names = fp8_linears(quant)
    assert len(names) == 2 * 2 * 2 + 2  # 2 double blocks x 2 streams x (qkv, proj) + 2 single blocks' linear1
    assert {n.split(".", 2)[2] for n in names} == {"img_attn.qkv", "img_attn.proj", "txt_attn.qkv",
                                                  "txt_attn.proj", "linear1"}  # fmt: skip
    kept = {n for n, m in quant.named_modules() if type(m) is nn.Linear}
    in_blocks = {n for n in kept if n.startswith(("double_blocks.", "single_blocks."))}
    assert {n.split(".")[0] for n in kept - in_blocks} == set(DEFAULT_SKIP)
    assert {n.split(".", 2)[2] for n in in_blocks} == {
        "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2", "linear2"}  # fmt: skip
    everything = quantize_transformer(bench_init_flux2(), skip=DEFAULT_SKIP)
    assert len(fp8_linears(everything)) == 2 * 8 + 2 * 2  # + the MLPs and linear2
    assert isinstance(quant.final_layer.adaLN_modulation[1], nn.Linear)


def test_skip_entries_are_prefixes_or_patterns():
    assert skipped("final_layer.linear", ("final_layer",)) and skipped("time_in.in_layer", DEFAULT_SKIP)
    assert not skipped("final_layer_x", ("final_layer",))  # a prefix ends at a dot
    assert skipped("double_blocks.3.img_mlp.0", FP8_SKIP) and skipped("img_mlp.2", FP8_SKIP)  # whole model or block
    assert skipped("single_blocks.47.linear2", FP8_SKIP) and skipped("linear2", FP8_SKIP)
    assert not skipped("single_blocks.0.linear1", FP8_SKIP) and not skipped("double_blocks.0.txt_attn.qkv", FP8_SKIP)


@torch.no_grad()
def test_custom_skip_keeps_more_layers():
    quant = quantize_transformer(bench_init_flux2(), skip=(*FP8_SKIP, "single_blocks"))
    assert fp8_linears(quant) and all(n.startswith("double_blocks.") for n in fp8_linears(quant))
    assert type(quant.single_blocks[1].linear1) is nn.Linear


@torch.no_grad()
def test_dtype_casts_leave_quantized_storage_alone():
    model = quantize_transformer(bench_init_flux2())
    layer = model.double_blocks[0].img_attn.qkv
    w, s = layer.weight.clone(), layer.weight_scale.clone()
    model.to(torch.bfloat16)  # the usual "run in bf16" cast must not touch the fp8 weights or fp32 scales
    assert layer.weight.dtype == E4M3 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), w.view(torch.uint8)) and torch.equal(layer.weight_scale, s)
    assert model.img_in.weight.dtype == torch.bfloat16 and layer.impl == "reference"  # "auto" on a CPU
    inp = list(tiny_inputs(model.cfg, refs=0))
    inp[0], inp[3] = inp[0].bfloat16(), inp[3].bfloat16()
    v = model(*inp)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()


def _scaled_mm_vs_reference(device, m: int, k: int, n: int, fast_accum: bool) -> float:
    g = torch.Generator(device=device).manual_seed(m + k + n)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    w_q, w_scale = quantize_rowwise(torch.randn(n, k, device=device, generator=g) / k**0.5)
    ref = fp8_matmul_reference(x, w_q, w_scale)
    out = fp8_matmul_scaled_mm(x, w_q, w_scale, fast_accum)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_scaled_mm_call_on_cpu_if_this_torch_has_it():
    """The exact `_scaled_mm` call of the GPU path; torch 2.13's CPU build implements rowwise scales too."""
    try:
        rel = _scaled_mm_vs_reference(torch.device("cpu"), 48, 64, 32, fast_accum=False)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch build has no CPU _scaled_mm with rowwise scales: {e}")
    print(f"CPU _scaled_mm vs reference: rel L2 {rel:.2e}")
    assert rel < 1e-2  # both bf16 out: rounding only


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fast_accum", [False, True])
def test_gpu_scaled_mm_matches_reference(fast_accum):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9+")
    dev = torch.device("cuda")
    for m, k, n in ((4608, 3072, 9216), (300, 6144, 18432), (17, 64, 48)):  # incl. M not a multiple of 16 / 256
        rel = _scaled_mm_vs_reference(dev, m, k, n, fast_accum)
        print(f"_scaled_mm vs reference {m}x{k}x{n} fast_accum={fast_accum}: rel L2 {rel:.2e}")
        assert rel < 1e-2  # bf16 output rounding (~2e-3) plus accumulation order


@pytest.mark.gpu
@needs_cuda
@torch.no_grad()
def test_gpu_quantized_transformer_scaled_mm_equals_reference_path():
    """The two fp8 paths differ by bf16 rounding (output, accumulation order), which the model amplifies as it
    amplifies bf16's own rounding: the bound is a multiple of the bf16 model's distance to the fp32 one."""
    fp32 = bench_init_flux2().cuda()
    model = copy.deepcopy(fp32).to(torch.bfloat16)
    inp32 = [t.cuda() for t in tiny_inputs(model.cfg, refs=1)]
    inp = list(inp32)
    inp[0], inp[3] = inp[0].bfloat16(), inp[3].bfloat16()
    fast = quantize_transformer(copy.deepcopy(model))
    assert fast.single_blocks[0].linear1.impl == "scaled_mm"
    slow = quantize_transformer(copy.deepcopy(model), impl="reference")
    a, b, exact, ref32 = fast(*inp).float(), slow(*inp).float(), model(*inp).float(), fp32(*inp32)
    paths, bf16_noise = _rel(a, b), _rel(exact, ref32)
    print(f"scaled_mm vs reference {paths:.2e}, bf16 vs fp32 model {bf16_noise:.2e}, fp8 vs bf16 {_rel(a, exact):.2e}")
    assert paths < 2 * bf16_noise + 5e-3
    assert _rel(a, exact) < VELOCITY_REL_L2 + 2 * bf16_noise  # bf16 rounding on top of fp8


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
