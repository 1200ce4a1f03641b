"""GGUF (GGML) block formats in torch: dequantisers, simple quantisers, and a linear layer that keeps the blocks.

Contract:
    dequantize_blocks(raw, qtype, k) -> (N, k) fp32   raw uint8 (N, row_bytes): each row is k/block blocks
    quantize_blocks(w, qtype) -> raw uint8 (N, row_bytes)   simple round-to-nearest quantisers (tests, bench)
    GgufLinear(in, out, qtype)                          buffer `weight` uint8 (N, row_bytes); dequantizes to
                                                        the activation dtype on the fly; `qtype` an attribute
    read_gguf(path) -> (GgufTensors, metadata)          via the `gguf` package's reader (memory-mapped)

Block layouts (ggml's, little endian; fp16 = IEEE half; a "super-block" holds QK_K = 256 values):
    Q8_0  34 B / 32:  d fp16, q int8[32]                                      w = d q
    Q4_0  18 B / 32:  d, qs[16]: value j in the low nibble of qs[j], j+16 in the high nibble     w = d (q - 8)
    Q4_1  20 B / 32:  d, m fp16, qs[16] as Q4_0                               w = d q + m
    Q5_0  22 B / 32:  d, qh u32 (bit j = 5th bit of value j), qs[16] as Q4_0  w = d (q - 16)
    Q5_1  24 B / 32:  d, m, qh, qs                                            w = d q + m
    Q4_K 144 B / 256: d, dmin fp16, scales[12] (8 six-bit scales sc and mins m), qs[128]; 64-value chunk c
                      reads qs[32c:32c+32]: low nibbles = sub-block 2c, high nibbles = 2c+1;  w = d sc q - dmin m
                      packing: bytes 0-3 = sc[0:4] | sc[4:8]>>4 << 6, 4-7 = m[0:4] | m[4:8]>>4 << 6,
                      8-11 = sc[4:8] & 15 | (m[4:8] & 15) << 4
    Q5_K 176 B / 256: d, dmin, scales[12] as Q4_K, qh[32], qs[128]; value l of sub-block s takes bit s of qh[l]
    Q6_K 210 B / 256: ql[128], qh[64], scales int8[16] (one per 16 values), d fp16; half h (128 values) uses
                      ql[64h:], qh[32h:]; value 32i + l (i < 4) = (ql nibble i>>1 of byte l + 32 (i & 1))
                      | ((qh[l] >> 2i) & 3) << 4, minus 32
Other types (Q2_K, Q3_K, the IQ family, ...) are dequantized once at load by the `gguf` package (numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ggml type ids (stable across GGUF versions) -> (values per block, bytes per block)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30
BLOCKS = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34), Q4_K: (256, 144),
          Q5_K: (256, 176), Q6_K: (256, 210)}  # fmt: skip
NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
         Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}  # fmt: skip
QTYPES = {v: k for k, v in NAMES.items()}


def type_name(qtype: int) -> str:
    return NAMES.get(qtype, f"ggml type {qtype}")


# -------------------------------------------------------------------------------------------- dequantisers
def _f16(b: torch.Tensor) -> torch.Tensor:
    """(B, 2) bytes -> (B, 1) fp32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """(B, 16) bytes -> (B, 32): low nibbles are values 0-15, high nibbles 16-31."""
    return torch.cat([qs & 15, qs >> 4], dim=1).float()


def _qh_bits(b: torch.Tensor) -> torch.Tensor:
    """(B, 4) bytes of a little-endian u32 -> (B, 32) bits, bit j first."""
    bits = (b.long()[:, :, None] >> torch.arange(8, device=b.device)) & 1  # (B, 4, 8)
    return bits.reshape(-1, 32).float()


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 12) packed bytes -> sc, m (B, 8) six-bit values (Q4_K / Q5_K)."""
    s = s.long()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc.float(), m.float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(B, 128) bytes -> (B, 8, 32): chunk c gives sub-block 2c (low nibbles) and 2c+1 (high nibbles)."""
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=2).reshape(-1, 8, 32).float()


def _q8_0(b):
    return _f16(b[:, 0:2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b):
    return _f16(b[:, 0:2]) * (_nibbles_32(b[:, 2:18]) - 8)


def _q4_1(b):
    return _f16(b[:, 0:2]) * _nibbles_32(b[:, 4:20]) + _f16(b[:, 2:4])


def _q5_0(b):
    return _f16(b[:, 0:2]) * (_nibbles_32(b[:, 6:22]) + 16 * _qh_bits(b[:, 2:6]) - 16)


def _q5_1(b):
    return _f16(b[:, 0:2]) * (_nibbles_32(b[:, 8:24]) + 16 * _qh_bits(b[:, 4:8])) + _f16(b[:, 2:4])


def _q4_k(b):
    sc, m = _k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _k_nibbles(b[:, 16:144])  # (B, 8, 32)
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(-1, 256)


def _q5_k(b):
    sc, m = _k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    hi = (b[:, 16:48].long()[:, None, :] >> torch.arange(8, device=b.device)[None, :, None]) & 1  # (B, 8, 32)
    q = _k_nibbles(b[:, 48:176]) + 16 * hi.float()
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(-1, 256)


def _q6_k(b):
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32).long()  # (B, half, ., 32)
    lo = torch.cat([ql & 15, ql >> 4], dim=2).long()  # (B, 2, 4, 32): i = 0..3 -> bytes l, l+32, l, l+32
    shifts = 2 * torch.arange(4, device=b.device)[None, None, :, None]
    q = (lo | (((qh >> shifts) & 3) << 4)).float() - 32  # (B, 2, 4, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8, 1)  # one per 16 values
    d = _f16(b[:, 208:210]).reshape(-1, 1, 1, 1)
    return (d * sc * q.reshape(-1, 2, 8, 16)).reshape(-1, 256)


_DEQUANT = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k}


def dequantize_blocks(raw: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """raw uint8 (N, row_bytes) of `qtype` blocks -> (N, k) fp32."""
    if qtype not in _DEQUANT:
        raise ValueError(f"no torch dequantiser for GGUF {type_name(qtype)}")
    size = BLOCKS[qtype][1]
    return _DEQUANT[qtype](raw.reshape(-1, size)).reshape(raw.shape[0], k)


# ---------------------------------------------------------------------- quantisers (simple, round to nearest)
def _to_f16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values rounded to fp16 (as fp32) and their two bytes."""
    h = x.to(torch.float16)
    return h.float(), h.reshape(-1, 1).view(torch.uint8)


def _pack_k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    sc, m = sc.long(), m.long()
    out = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                     (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], dim=1)  # fmt: skip
    return out.to(torch.uint8)


def _quant_k_affine(x: torch.Tensor, levels: int):
    """x (B, 256) -> d, dmin bytes, packed scales, codes (B, 8, 32) in [0, levels]: w ≈ d sc q - dmin m."""
    sub = x.reshape(-1, 8, 32)
    lo, hi = sub.amin(-1).clamp(max=0), sub.amax(-1)
    scale, mins = (hi - lo) / levels, -lo  # per sub-block, >= 0
    d, d_b = _to_f16(scale.amax(-1, keepdim=True) / 63)
    dmin, dmin_b = _to_f16(mins.amax(-1, keepdim=True) / 63)
    sc = torch.where(d > 0, (scale / d.clamp(min=1e-30)).round(), 0).clamp(0, 63)
    m = torch.where(dmin > 0, (mins / dmin.clamp(min=1e-30)).round(), 0).clamp(0, 63)
    step = (d * sc)[..., None]
    q = torch.where(step > 0, ((sub + (dmin * m)[..., None]) / step.clamp(min=1e-30)).round(), 0).clamp(0, levels)
    return d_b, dmin_b, _pack_k_scales(sc, m), q.long()


def _quant_q4_k(x):
    d, dmin, s, q = _quant_k_affine(x, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: low = sub-block 2c, high = 2c+1
    return torch.cat([d, dmin, s, qs.to(torch.uint8)], dim=1)


def _quant_q5_k(x):
    d, dmin, s, q = _quant_k_affine(x, 31)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    qh = ((q >> 4) << torch.arange(8, device=x.device)[None, :, None]).sum(1)  # (B, 32): bit s from sub-block s
    return torch.cat([d, dmin, s, qh.to(torch.uint8), qs.to(torch.uint8)], dim=1)


def _quant_q6_k(x):
    sub = x.reshape(-1, 16, 16)
    amax_i = sub.abs().argmax(-1, keepdim=True)
    scale = sub.gather(-1, amax_i).squeeze(-1) / -32  # signed, so the largest value maps to -32 exactly
    d, d_b = _to_f16(scale.abs().amax(-1, keepdim=True) / 127)
    sc = torch.where(d > 0, (scale / d.clamp(min=1e-30)).round(), 0).clamp(-128, 127)
    step = (d * sc)[..., None]
    q = torch.where(step != 0, (sub / torch.where(step != 0, step, 1)).round(), 0).clamp(-32, 31) + 32  # (B,16,16)
    q = q.long().reshape(-1, 2, 4, 32)  # (B, half, i, l): value 32 i + l of the half
    ql = torch.cat([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4), (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], 2)
    qh = sum(((q[:, :, i] >> 4) & 3) << (2 * i) for i in range(4))  # (B, 2, 32)
    scb = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.reshape(-1, 128).to(torch.uint8), qh.reshape(-1, 64).to(torch.uint8), scb, d_b], dim=1)


def _quant_q8_0(x):
    blocks = x.reshape(-1, 32)
    d, d_b = _to_f16(blocks.abs().amax(-1, keepdim=True) / 127)
    q = torch.where(d > 0, blocks / d.clamp(min=1e-30), 0).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d_b, q.view(torch.uint8)], dim=1)


_QUANT = {Q8_0: _quant_q8_0, Q4_K: _quant_q4_k, Q5_K: _quant_q5_k, Q6_K: _quant_q6_k}


@torch.no_grad()
def quantize_blocks(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """(N, K) -> raw uint8 (N, K / block * bytes): plain round-to-nearest, no scale search and no importance
    matrix, so its error is an upper bound on what llama.cpp's quantisers give for the same type."""
    if qtype not in _QUANT:
        raise ValueError(f"no quantiser for GGUF {type_name(qtype)}; have {', '.join(type_name(t) for t in _QUANT)}")
    per, size = BLOCKS[qtype]
    n, k = w.shape
    if k % per:
        raise ValueError(f"GGUF {type_name(qtype)} needs rows that are a multiple of {per}, got {k}")
    return _QUANT[qtype](w.float().reshape(-1, per)).reshape(n, k // per * size)


# ---------------------------------------------------------------------------------------------- the layer
class GgufLinear(nn.Module):
    """A Linear whose weight stays in GGUF blocks (`weight` uint8 (N, row_bytes)); dequantized per call."""

    def __init__(self, in_features: int, out_features: int, qtype: int, *, device=None):
        super().__init__()
        if qtype not in _DEQUANT:
            raise ValueError(f"GgufLinear supports {', '.join(type_name(t) for t in _DEQUANT)}, not {type_name(qtype)}")
        per, size = BLOCKS[qtype]
        if in_features % per:
            raise ValueError(f"GGUF {type_name(qtype)} rows hold multiples of {per} values, not {in_features}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("weight", torch.empty(out_features, in_features // per * size, dtype=torch.uint8,
                                                   device=device))  # fmt: skip

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.weight, self.qtype, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {type_name(self.qtype)}"


# -------------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class GgufTensor:
    name: str
    qtype: int
    shape: tuple[int, ...]  # logical shape, PyTorch order (ggml lists dims innermost first)
    data: np.ndarray  # memory-mapped: uint8 (rows, row_bytes) for block types, else the values


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'fluxrt[quant]'") from None
    return gguf


def read_gguf(path) -> tuple[dict[str, GgufTensor], dict]:
    """Tensors (memory-mapped) and the metadata fluxrt reads (`general.architecture`, `comfy.*`) of a GGUF file.
    ComfyUI-GGUF records shapes it had to reshape as `comfy.gguf.orig_shape.<name>`; those win over the stored one."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if k == "general.architecture" or k.startswith("comfy.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        orig = meta.get(f"comfy.gguf.orig_shape.{t.name}")
        tensors[t.name] = GgufTensor(t.name, int(t.tensor_type), tuple(int(s) for s in orig) if orig else shape, t.data)
    return tensors, meta


def gguf_numpy_dequantize(t: GgufTensor) -> np.ndarray:
    """Any type the gguf package knows -> fp32 values in the logical shape."""
    gguf = _require_gguf()
    return gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(t.qtype)).reshape(t.shape)


def tensor_values(t: GgufTensor) -> torch.Tensor:
    """A plain (non-block) GGUF tensor as a torch tensor of its own dtype, logical shape."""
    data = np.asarray(t.data)
    if t.qtype == BF16:
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(t.shape)
    if t.qtype in (F32, F16):
        return torch.from_numpy(data.copy()).reshape(t.shape)
    return torch.from_numpy(gguf_numpy_dequantize(t).astype(np.float32))


def write_gguf(path, tensors: dict[str, tuple[int, torch.Tensor]], arch: str = "flux") -> None:
    """Write `{name: (qtype, tensor)}`: block types take raw uint8 (N, row_bytes), F32/F16/BF16 the values."""
    gguf = _require_gguf()
    w = gguf.GGUFWriter(str(path), arch)
    for name, (qtype, t) in tensors.items():
        t = t.detach().cpu().contiguous()
        if qtype == BF16:
            w.add_tensor(name, t.view(torch.int16).numpy(), raw_shape=t.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif qtype in (F32, F16):
            w.add_tensor(name, t.numpy())
        else:
            w.add_tensor(name, t.numpy(), raw_dtype=gguf.GGMLQuantizationType(qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
