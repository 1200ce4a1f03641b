"""Group-wise asymmetric int4 weight-only linear layers: a lossy, opt-in transform.

Contract:
    quantize_int4(w, group=128) -> (packed, scale, zero)   w (N, K) -> packed uint8 (N, K/2),
                                   scale and zero bf16 (N, K/group); w ≈ (q - 8) * scale + zero, q in [0, 15]
    dequantize_int4(packed, scale, zero) -> (N, K) fp32
    Int4Linear.from_linear(linear, group=128)   buffers `weight` uint8 (N, K/2), `weight_scale`, `weight_zero`
    Int4Linear(x) (..., K) -> (..., N)          x's dtype out

The affine form `(q - 8) * scale + zero` with bf16 scales and zeros is the convention of the int4 "tinygemm"
kernel in PyTorch core (`torch._weight_int4pack_mm`, the kernel torchao's int4 weight-only config calls), so a
file of ours feeds it without requantising. Per group: scale = (max - min) / 15, zero = min + 8 * scale, both
rounded to bf16 before the codes are chosen, so the codes are the nearest ones for the scales actually stored.
Two codes per byte, the first of a pair in the high nibble (the uint8 layout `_convert_weight_to_int4pack` takes).

Implementations: "reference" (dequantize to x's dtype, F.linear; any device) and "tinygemm" (CUDA, bf16
activations, K a multiple of 1024 per the kernel's tiling; "auto" picks it where it applies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import pack_nibbles, unpack_nibbles

GROUP = 128  # torchao's default int4 group size
IMPLS = ("auto", "tinygemm", "reference")
_INNER_K_TILES = 8  # tinygemm weight tiling; needs K % (16 * 8 * 8) == 0
_TINY = 1e-8  # scale floor for a constant group
_ROWS_PER_CHUNK = 4096


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) -> packed uint8 (N, K/2), scale bf16 (N, K/group), zero bf16 (N, K/group)."""
    n, k = w.shape
    if k % group or group % 2:
        raise ValueError(f"int4 needs in_features {k} to be a multiple of the group size {group}")
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, k // group, dtype=torch.bfloat16, device=w.device)
    zero = torch.empty_like(scale)
    for i in range(0, n, _ROWS_PER_CHUNK):
        g = w[i : i + _ROWS_PER_CHUNK].float().reshape(-1, k // group, group)  # (rows, K/group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / 15).clamp(min=_TINY).bfloat16()
        z = (lo + 8 * s.float()).bfloat16()
        q = ((g - z.float()[..., None]) / s.float()[..., None] + 8).round_().clamp_(0, 15)
        packed[i : i + _ROWS_PER_CHUNK] = pack_nibbles(q.reshape(-1, k))
        scale[i : i + _ROWS_PER_CHUNK], zero[i : i + _ROWS_PER_CHUNK] = s, z
    return packed, scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32):
    """packed (N, K/2), scale / zero (N, K/group) -> (N, K) in `dtype`."""
    n, ng = scale.shape
    q = unpack_nibbles(packed).reshape(n, ng, -1).float() - 8  # (N, K/group, group)
    return (q * scale[..., None].float() + zero[..., None].float()).reshape(n, -1).to(dtype)


def tinygemm_supported(device, in_features: int, out_features: int) -> bool:
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and hasattr(torch, "_weight_int4pack_mm")
            and in_features % (16 * _INNER_K_TILES * 8) == 0 and out_features % 8 == 0)  # fmt: skip


class Int4Linear(nn.Module):
    """A Linear whose weight is stored as group-wise asymmetric int4 codes with bf16 scales and zeros."""

    def __init__(self, in_features: int, out_features: int, *, group: int = GROUP, bias: bool = False,
                 impl: str = "auto", device=None):  # fmt: skip
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"Int4Linear impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        if in_features % group or group % 2:
            raise ValueError(f"int4 needs in_features {in_features} to be a multiple of the group size {group}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.auto = impl == "auto"
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        ng = in_features // group
        self.register_buffer("weight_scale", torch.empty(out_features, ng, dtype=torch.bfloat16, device=device))
        self.register_buffer("weight_zero", torch.empty(out_features, ng, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.impl = self._resolve() if self.auto else impl
        self._packed = None  # (device, tinygemm weight, scales_and_zeros), built at the first tinygemm call

    def _resolve(self) -> str:
        ok = tinygemm_supported(self.weight.device, self.in_features, self.out_features)
        return "tinygemm" if ok else "reference"

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts leave the codes and the bf16 scales / zeros alone."""
        kept = {n: self._buffers[n] for n in ("weight_scale", "weight_zero")}
        super()._apply(fn, recurse)
        for n, t in kept.items():
            if self._buffers[n].dtype != t.dtype:
                self._buffers[n] = t.to(self._buffers[n].device)
        self._packed = None
        if self.auto:
            self.impl = self._resolve()
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group: int = GROUP, impl: str = "auto") -> Int4Linear:
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, group=group, bias=linear.bias is not None, impl=impl,
                  device=w.device)  # fmt: skip
        out.weight, out.weight_scale, out.weight_zero = quantize_int4(w, group)
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, self.weight_zero, dtype)

    def _tinygemm_operands(self):
        if self._packed is None or self._packed[0] != self.weight.device:
            w = torch._convert_weight_to_int4pack(self.weight.contiguous(), _INNER_K_TILES)
            sz = torch.stack([self.weight_scale.t(), self.weight_zero.t()], dim=-1).contiguous()  # (K/group, N, 2)
            self._packed = (self.weight.device, w, sz)
        return self._packed[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.impl == "tinygemm":
            w, sz = self._tinygemm_operands()
            x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int4pack_mm(x2d, w, self.group, sz).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, impl={self.impl}"
