"""The NF4 reference path's byte-table dequantization and row-chunked product (fluxrt.quant.nf4), on the CPU.

Oracle: the formula the layer is defined by, written out independently here: index = the nibble (high first),
value = code[index] * absmax of its block in fp32, rounded once to the target dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fluxrt.quant import nf4
from fluxrt.quant.nf4 import CODES, Nf4Linear, byte_table, chunk_rows, dequantize_nf4


def formula(packed: torch.Tensor, absmax: torch.Tensor, code, dtype) -> torch.Tensor:
    """The straightforward dequantization: int64 nibbles, fp32 gather, fp32 product, one cast."""
    n, nb = absmax.shape
    idx = torch.stack([packed.long() // 16, packed.long() % 16], dim=-1).reshape(n, nb, -1)  # (N, K/block, block)
    return (torch.tensor(code, dtype=torch.float32)[idx] * absmax.float()[..., None]).reshape(n, -1).to(dtype)


def random_layer(n: int, k: int, block: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every byte value, and absmax spanning many binades (so that the bf16 / fp16 roundings are exercised)."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    absmax = torch.exp(torch.randn(n, k // block, generator=g) * 3)
    absmax[0, 0] = 0.0  # an all-zero block
    return packed, absmax


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 rows for K=256, so that a few hundred rows take several chunks and a remainder."""
    monkeypatch.setattr(nf4, "_DEQUANT_WEIGHTS", 64 * 256)
    assert chunk_rows(256) == 64


def test_byte_table_decodes_both_nibbles_and_is_cached():
    table = byte_table("nf4", "cpu")
    assert table is byte_table("nf4", "cpu") and table.shape == (256,)
    pairs = table.view(torch.float32).reshape(256, 2)
    code = torch.tensor(CODES["nf4"])
    b = torch.arange(256)
    assert torch.equal(pairs[:, 0], code[b >> 4]) and torch.equal(pairs[:, 1], code[b & 15])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_is_bit_identical_to_the_formula(dtype, quant_type, small_chunks):
    packed, absmax = random_layer(203, 256)  # 203 rows: three chunks of 64 and one of 11
    got = dequantize_nf4(packed, absmax, torch.tensor(CODES[quant_type]), dtype)
    want = formula(packed, absmax, CODES[quant_type], dtype)
    assert got.dtype == dtype and got.shape == (203, 256)
    assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))  # bit for bit (and -0.0)


def test_dequantize_default_chunking_matches_the_formula_on_a_wide_layer():
    packed, absmax = random_layer(70, 8 * 8192, seed=1)  # chunk_rows(65536) = 128 > 70: one chunk
    code = CODES["nf4"]
    assert torch.equal(dequantize_nf4(packed, absmax, torch.tensor(code), torch.bfloat16),
                       formula(packed, absmax, code, torch.bfloat16))  # fmt: skip


def _layer(n: int, k: int, bias: bool) -> Nf4Linear:
    torch.manual_seed(0)
    return Nf4Linear.from_linear(nn.Linear(k, n, bias=bias), impl="reference")


def _matmul_bound(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How far two fp32-accumulated products x @ w^T may differ when they sum the K terms in different orders
    (a BLAS may block K differently for a 64-column chunk than for the whole weight): K * eps32 * |x| @ |w|^T,
    plus one ulp of the output dtype, since two fp32 sums that differ can round to neighbouring outputs."""
    k = x.shape[-1]
    mag = x.abs().float() @ w.abs().float().t()
    return k * torch.finfo(torch.float32).eps * mag + torch.finfo(y.dtype).eps * y.float().abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_forward_equals_the_whole_weight_product(dtype, bias, small_chunks, monkeypatch):
    q = _layer(203, 256, bias)
    if bias:  # distinct, large values: a bias slice from the wrong columns would be far outside the bound
        q.bias.data = torch.randn(203) * 4
    seen = []
    real = nf4._dequantize_into
    monkeypatch.setattr(nf4, "_dequantize_into", lambda out, *a: (seen.append(out.shape[0]), real(out, *a)))
    x = torch.randn(2, 7, 256).to(dtype)
    y = q(x)
    assert seen == [64, 64, 64, 11]  # the weight was decoded a chunk at a time, never whole
    w = q.dequantized(dtype)
    want = F.linear(x, w, None if q.bias is None else q.bias.to(dtype))
    assert y.shape == (2, 7, 203) and y.dtype == dtype
    diff = (y.float() - want.float()).abs()
    print(f"chunked vs whole-weight product, {dtype}, bias={bias}: max |diff| {diff.max().item():.2e}")
    assert (diff <= _matmul_bound(x, w, want)).all(), diff.max()


def test_small_layer_forward_is_one_product():
    q = _layer(48, 128, bias=True)
    x = torch.randn(3, 128)
    assert torch.equal(q(x), F.linear(x, q.dequantized(), q.bias))  # one chunk: the very same call


def test_default_chunks_bound_the_temporaries_of_dev_sized_layers():
    for k in (3072, 6144, 18432, 24576):  # FLUX.2 [dev] / klein input widths
        rows = chunk_rows(k)
        assert rows % 64 == 0 and rows * k * (4 + 2 + 2) <= 80 * 2**20  # fp32 values, int32 indices, bf16 chunk
