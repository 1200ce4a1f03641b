"""4-bit NormalFloat (NF4) weight-only linear layers, in bitsandbytes' data layout: a lossy, opt-in transform.

Contract:
    quantize_nf4(w, block=64) -> (packed, absmax)   w (N, K) -> packed uint8 (N, K/2), absmax fp32 (N, K/block)
    dequantize_nf4(packed, absmax, code) -> (N, K)  fp32, w ≈ code[nibble] * absmax of the nibble's block
    Nf4Linear.from_linear(linear, block=64)         buffers `weight` uint8 (N, K/2) + `weight_absmax` fp32 (N, K/block)
    Nf4Linear(x) (..., K) -> (..., N)               weight dequantized to x's dtype on the fly; x's dtype out

Layout (the one bitsandbytes serialises, so its files load without repacking): blocks of `block` consecutive
values of the row-major weight share one absmax; each value is the index of the nearest of 16 code values
(NF4: quantiles of a standard normal scaled to [-1, 1]) after dividing by its block's absmax; two indices per
byte, the first value of a pair in the high nibble. We require K % block == 0 so a block never straddles two
rows, which keeps rows independent (the diffusers QKV concatenation and adaLN half swap act on rows).

Implementations: "reference" (dequantize to x's dtype with torch ops, then F.linear; any device) and "bnb"
(`bitsandbytes.matmul_4bit`, CUDA only, used by "auto" when bitsandbytes imports and the layer is on CUDA).
The reference path decodes a byte (two weights) at a time through a 256-entry table, and a large layer a block of
rows at a time (its product too), so its fp32 temporaries stay near 50 MB whatever the layer's size. Its weights
are bit-identical to `code[nibble] * absmax` computed in fp32 and rounded once to x's dtype.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 64  # bitsandbytes' default block size for 4-bit weights
# The NF4 code (QLoRA, Dettmers et al. 2023): 16 normal quantiles mapped to [-1, 1] with an exact 0. These are
# the values every bitsandbytes NF4 file stores as `weight.quant_map`.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes' "fp4" code (1 sign, 2 exponent, 1 mantissa bit, as its files store it): loaded, never written.
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
IMPLS = ("auto", "bnb", "reference")
_TINY = 1e-12  # absmax floor: an all-zero block quantizes to the code's 0, not NaN
_ROWS_PER_CHUNK = 4096  # rows quantized at a time: bounded fp32 temporaries for a 6144x55296 layer
# Weights dequantized at a time: 32 MB of fp32 values + 16 MB of int32 byte indices + the chunk in x's dtype.
_DEQUANT_WEIGHTS = 1 << 23
_codes: dict[tuple[str, torch.device], torch.Tensor] = {}
_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_tensor(quant_type: str, device) -> torch.Tensor:
    """The 16 code values (fp32) on `device`, cached."""
    key = (quant_type, torch.device(device))
    if key not in _codes:
        _codes[key] = torch.tensor(CODES[quant_type], dtype=torch.float32, device=device)
    return _codes[key]


def byte_table(quant_type: str, device) -> torch.Tensor:
    """The decoding table of packed bytes on `device`, cached: see `_byte_table`."""
    key = (quant_type, torch.device(device))
    if key not in _tables:
        _tables[key] = _byte_table(code_tensor(quant_type, device))
    return _tables[key]


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b holds the 8 bytes of the fp32 pair (code[b >> 4], code[b & 15]), the two values
    byte b encodes (high nibble first). Gathering one 8-byte element per byte, then viewing the result as fp32,
    decodes two weights per index; on the CPU that is 1.5x faster than gathering rows of a (256, 2) table."""
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=-1)  # (256, 2) fp32
    return pairs.float().contiguous().view(torch.int64).squeeze(-1)


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """(..., 2M) integers in [0, 16) -> (..., M) uint8, element 2j in the high nibble."""
    idx = idx.to(torch.uint8)
    return (idx[..., 0::2] << 4) | idx[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (..., M) uint8 -> (..., 2M) int64 indices."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2).long()


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> packed uint8 (N, K/2) and absmax fp32 (N, K/block): nearest NF4 code per value."""
    n, k = w.shape
    if k % block or block % 2:
        raise ValueError(f"NF4 needs in_features {k} to be a multiple of the block size {block}")
    code = code_tensor("nf4", w.device)
    mids = (code[1:] + code[:-1]) / 2  # (15,) decision thresholds between neighbouring codes
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n, k // block, dtype=torch.float32, device=w.device)
    for i in range(0, n, _ROWS_PER_CHUNK):
        blocks = w[i : i + _ROWS_PER_CHUNK].float().reshape(-1, k // block, block)  # (rows, K/block, block)
        amax = blocks.abs().amax(-1).clamp(min=_TINY)
        idx = torch.bucketize(blocks / amax[..., None], mids)  # index of the nearest code (ties go up)
        packed[i : i + _ROWS_PER_CHUNK] = pack_nibbles(idx.reshape(-1, k))
        absmax[i : i + _ROWS_PER_CHUNK] = amax
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, dtype=torch.float32):
    """packed (N, K/2) uint8, absmax (N, K/block) -> (N, K) in `dtype`: code[nibble] * absmax in fp32, rounded
    once to `dtype`."""
    n, half = packed.shape
    out = torch.empty(n, 2 * half, dtype=dtype, device=packed.device)
    table = _byte_table(code)
    rows = chunk_rows(2 * half)
    for i in range(0, n, rows):
        _dequantize_into(out[i : i + rows], packed[i : i + rows], absmax[i : i + rows], table)
    return out


def chunk_rows(k: int) -> int:
    """Rows of a (N, k) weight dequantized at a time: about `_DEQUANT_WEIGHTS` weights, a multiple of 64 rows
    (so that each chunk's product is GEMM-tile friendly)."""
    return max(64, _DEQUANT_WEIGHTS // k // 64 * 64)


def _dequantize_into(out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor) -> None:
    """out (n, K) in any float dtype <- packed (n, K/2) decoded through `table` (see `_byte_table`) times absmax."""
    n, nb = absmax.shape
    idx = packed.reshape(-1).int()  # int32: int64 indices would cost 8 bytes per byte; uint8 ones would be a mask
    vals = table.index_select(0, idx).view(torch.float32).view(n, nb, -1)  # (n, K/block, block) fp32
    scale = absmax[..., None].float()
    if out.dtype == torch.float32:
        torch.mul(vals, scale, out=out.view(n, nb, -1))
    else:  # the fp32 product rounded once, as .to(dtype) does (a mixed-dtype mul with out= is 4x slower on CPU)
        out.view(n, nb, -1).copy_(vals.mul_(scale))


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


class Nf4Linear(nn.Module):
    """A Linear whose weight is stored as 4-bit codes (NF4, or bitsandbytes FP4 when loaded from such a file)."""

    def __init__(self, in_features: int, out_features: int, *, block: int = BLOCK, bias: bool = False,
                 quant_type: str = "nf4", impl: str = "auto", device=None):  # fmt: skip
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"Nf4Linear impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        if quant_type not in CODES:
            raise ValueError(f"unknown 4-bit code {quant_type!r}; known: {', '.join(CODES)}")
        if in_features % block or block % 2:
            raise ValueError(f"NF4 needs in_features {in_features} to be a multiple of the block size {block}")
        self.in_features, self.out_features, self.block, self.quant_type = in_features, out_features, block, quant_type
        self.auto = impl == "auto"
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.empty(out_features, in_features // block, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.impl = self._resolve() if self.auto else impl

    def _resolve(self) -> str:
        return "bnb" if self.weight.device.type == "cuda" and bnb_available() else "reference"

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts leave the uint8 codes and fp32 absmax alone."""
        absmax = self._buffers["weight_absmax"]
        super()._apply(fn, recurse)
        if self._buffers["weight_absmax"].dtype != absmax.dtype:
            self._buffers["weight_absmax"] = absmax.to(self._buffers["weight_absmax"].device)
        if self.auto:
            self.impl = self._resolve()
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, block: int = BLOCK, impl: str = "auto") -> Nf4Linear:
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, block=block, bias=linear.bias is not None, impl=impl,
                  device=w.device)  # fmt: skip
        out.weight, out.weight_absmax = quantize_nf4(w, block)
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The (N, K) weight this layer multiplies by."""
        return dequantize_nf4(self.weight, self.weight_absmax, code_tensor(self.quant_type, self.weight.device), dtype)

    def _reference(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, dequantized weight, bias), a block of output features at a time (`chunk_rows`): each
        block's weight is decoded, multiplied and freed before the next, so no temporary spans the whole layer."""
        n, rows = self.out_features, chunk_rows(self.in_features)
        table = byte_table(self.quant_type, self.weight.device)
        w = torch.empty(min(rows, n), self.in_features, dtype=x.dtype, device=self.weight.device)  # reused per block
        if n <= rows:
            _dequantize_into(w, self.weight, self.weight_absmax, table)
            return F.linear(x, w, bias)
        y = x.new_empty(*x.shape[:-1], n)  # (..., N)
        for i in range(0, n, rows):
            j = min(i + rows, n)
            _dequantize_into(w[: j - i], self.weight[i:j], self.weight_absmax[i:j], table)
            y[..., i:j] = F.linear(x, w[: j - i], None if bias is None else bias[i:j])  # (..., j - i)
        return y

    def _bnb_state(self, dtype):
        from bitsandbytes.functional import QuantState

        return QuantState(absmax=self.weight_absmax.reshape(-1), shape=torch.Size((self.out_features, self.in_features)),
                          code=code_tensor(self.quant_type, self.weight.device), blocksize=self.block,
                          quant_type=self.quant_type, dtype=dtype)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.impl == "bnb":
            import bitsandbytes as bnb

            return bnb.matmul_4bit(x, self.weight.reshape(-1, 1).t(), quant_state=self._bnb_state(x.dtype), bias=bias)
        return self._reference(x, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"block={self.block}, impl={self.impl}")  # fmt: skip


# ------------------------------------------------------------------------------ bitsandbytes serialisation
BNB_STATE = ".weight.quant_state.bitsandbytes__"  # + "nf4" / "fp4": the JSON blob of a serialised QuantState
BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def bnb_state_json(blob: torch.Tensor) -> dict:
    """The JSON dict of a `weight.quant_state.bitsandbytes__*` uint8 tensor."""
    return json.loads(bytes(blob.cpu().tolist()).decode())


def bnb_absmax(parts: dict, state: dict) -> torch.Tensor:
    """fp32 absmax per block from a bitsandbytes quant state; undoes the nested (double) quantisation:
    absmax = nested_quant_map[byte] * nested_absmax[block // nested_blocksize] + nested_offset."""
    absmax = parts["absmax"]
    if "nested_absmax" not in parts:
        return absmax.float()
    nb = state.get("nested_blocksize", 256)
    scale = parts["nested_absmax"].float().repeat_interleave(nb)[: absmax.numel()]
    return parts["nested_quant_map"].float()[absmax.long()] * scale + float(state.get("nested_offset", 0.0))
