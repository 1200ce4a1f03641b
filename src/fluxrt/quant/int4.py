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

Implementations: "reference" (dequantize to x's dtype, F.linear; any device) and "tinygemm" (bf16 activations,
K a multiple of 1024 per the kernel's tiling; "auto" picks it on CUDA where it applies; on the CPU it runs
PyTorch's CPU port of the kernel when asked for by name, which is how the tests check the logic below).

One copy of the weight: the kernel reads its own repacked layout of the codes, built at the first tinygemm call.
A resident layer then frees its uint8 `weight` codes (`weight` is None until they are needed again), so its
weight is held once, in 4.25 bits. Whatever needs the codes gets them back (`state_dict`, `dequantized`, a device
move, `release_cache`): they are read out of the repacked copy through the kernel itself, which drops that copy.
Layers whose tensors a streamer rebinds every call set `keep_codes` (memory/stream.py does) and drop the repacked
copy after each call instead (`release_cache`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import pack_nibbles, unpack_nibbles

GROUP = 128  # torchao's default int4 group size
IMPLS = ("auto", "tinygemm", "reference")
_INNER_K_TILES = 8  # tinygemm weight tiling; needs K % (16 * 8 * 8) == 0
_TINY = 1e-8  # scale floor for a constant group
_ROWS_PER_CHUNK = 4096
_READ_COLS = 256  # input features read back from the repacked codes per kernel call: a (256, N) bf16 product
_PROBE_COLS = 16  # columns read back before the codes are freed, to check that the read-back is exact


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


def tinygemm_pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K/2) -> the kernel's weight layout on their device (CUDA, or the CPU port)."""
    if codes.device.type == "cuda":
        return torch._convert_weight_to_int4pack(codes.contiguous(), _INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(codes).int(), _INNER_K_TILES)


def tinygemm_mm(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """x bf16 (M, K) @ ((q - 8) * scale + zero)^T -> (M, N) bf16; sz (K/group, N, 2) holds (scale, zero)."""
    if x.device.type == "cuda":
        return torch._weight_int4pack_mm(x, w, group, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz)


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
        self.keep_codes = False  # True: keep `weight` beside the repacked copy (set on layers a streamer rebinds)

    def _resolve(self) -> str:
        ok = tinygemm_supported(self.weight_scale.device, self.in_features, self.out_features)
        return "tinygemm" if ok else "reference"

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts leave the codes and the bf16 scales / zeros alone."""
        self.release_cache()  # the codes move, not the kernel's copy of them
        kept = {n: self._buffers[n] for n in ("weight_scale", "weight_zero")}
        super()._apply(fn, recurse)
        for n, t in kept.items():
            if self._buffers[n].dtype != t.dtype:
                self._buffers[n] = t.to(self._buffers[n].device)
        if self.auto:
            self.impl = self._resolve()
        return self

    def release_cache(self) -> None:
        """Drop the kernel's repacked copy of the codes; when it was their only copy, read the uint8 codes back
        out of it first. The next tinygemm call repacks."""
        if self._buffers["weight"] is None:
            with torch.no_grad(), torch.inference_mode(False):  # codes usable as an ordinary buffer afterwards
                self._buffers["weight"] = self._read_codes(0, self.in_features)
        self._packed = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._buffers["weight"] is None:  # the file holds the codes, not the kernel's layout of them
            self.release_cache()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.release_cache()  # `weight` takes the loaded codes; a repacked copy of the old ones would be stale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        if self._buffers["weight"] is None:
            self.release_cache()
        return dequantize_int4(self.weight, self.weight_scale, self.weight_zero, dtype)

    def _tinygemm_operands(self):
        device = self.weight_scale.device
        if self._packed is None or self._packed[0] != device:
            self.release_cache()
            w = tinygemm_pack(self.weight)
            sz = torch.stack([self.weight_scale.t(), self.weight_zero.t()], dim=-1).contiguous()  # (K/group, N, 2)
            self._packed = (device, w, sz)
            if not self.keep_codes:
                self._free_codes()
        return self._packed[1:]

    def _read_codes(self, start: int, stop: int) -> torch.Tensor:
        """uint8 codes (N, (stop - start) / 2) of input features [start, stop), read out of the repacked copy:
        with scale 1 and zero 8 the kernel's weight is the code q itself, and a product with rows of the identity
        returns it column by column (integers up to 15: exact in bf16), whatever the kernel's internal layout."""
        device, w, _ = self._packed
        n, k = self.out_features, self.in_features
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=device)
        sz = unit.expand(k // self.group, n, 2).contiguous()  # (K/group, N, 2)
        out = torch.empty(n, (stop - start) // 2, dtype=torch.uint8, device=device)
        for i in range(start, stop, _READ_COLS):
            j = min(i + _READ_COLS, stop)
            eye = torch.zeros(j - i, k, dtype=torch.bfloat16, device=device)
            eye.diagonal(i).fill_(1)  # row r selects input feature i + r
            q = tinygemm_mm(eye, w, self.group, sz)  # (j - i, N): q[r, n] = code of weight (n, i + r)
            out[:, (i - start) // 2 : (j - start) // 2] = pack_nibbles(q.t())
        return out

    def _free_codes(self) -> None:
        """Resident layer: the repacked copy holds the codes, so free `weight` once a read-back of its first
        columns matches (a kernel with other conventions keeps both copies and says so)."""
        probe = min(self.in_features, _PROBE_COLS)
        if torch.equal(self._read_codes(0, probe), self.weight[:, : probe // 2]):
            self._buffers["weight"] = None
            return
        warnings.warn(f"Int4Linear: the int4 kernel on {self.weight.device} does not read the codes back exactly; "
                      "keeping both copies", stacklevel=3)  # fmt: skip
        self.keep_codes = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.impl == "tinygemm":
            w, sz = self._tinygemm_operands()
            x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = tinygemm_mm(x2d, w, self.group, sz).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, impl={self.impl}"
