"""Rowwise-scaled fp8 (e4m3) linear layers: a lossy, opt-in `(module) -> module` transform.

Contract:
    quantize_rowwise(x, amax=None) -> (q, scale)   x (..., K) -> q (..., K) float8_e4m3fn, scale (...) fp32,
                                           x ≈ q * scale[..., None]; scale = amax(|row|) / 448
    Fp8Linear.from_linear(linear)          weight float8_e4m3fn (N, K) + weight_scale fp32 (N,)
    Fp8Linear(x) (..., K) -> (..., N)      activations quantized per row (token) on the fly, x's dtype out
    quantize_transformer(model, skip=FP8_SKIP)  every nn.Linear outside `skip` -> Fp8Linear, in place
    skipped(name, skip) -> bool            `skip` entries are module-name prefixes or glob patterns ("*linear2")

Which layers (FP8_SKIP, the default): the attention-side products run in fp8 (double blocks: img/txt qkv and proj;
single blocks: linear1 = [q|k|v|gate|up]); every MLP output product (single blocks' linear2, double blocks'
mlp.0 and mlp.2) stays in the compute dtype, as do the embedders, modulations and final layer (DEFAULT_SKIP).
On random weights (bench/fp8_error.py, bench/RESULTS.md "fp8 error") e4m3's ~3.7% error per product adds up in
quadrature over the layers, and MLP products cost 0.2-0.45 %² of velocity error per % of FLOPs against 0.01-0.14
for attention-side ones (q/k/v errors are averaged by attention). klein-4B at 1024²: quantizing every block
Linear puts 81% of the step's FLOPs in fp8 at 3.8-4.0% velocity error (emulated, vs fp32); FP8_SKIP puts 50% in
fp8 at 2.6-2.7% (2.9-3.0% with the real layers against the bf16 model, whose own bf16 noise is 1.2% there), and a
compiled step is 19% faster than compiled bf16 on an H100 (every block Linear: 24%). dev errs more: 5.8% (all: 8.7%).

Rounding bound (round to nearest, 3 mantissa bits): |dequant(q) - x| <= 2^-4 |x| for elements in e4m3's normal
range (|x| / scale >= 2^-6) and <= 2^-10 scale below it (half the subnormal spacing 2^-9). On Gaussian data the
RMS error is about 2.6% per operand, so one W8A8 matmul is off by about 3.7% (relative L2): that is the cost of
e4m3, not of this code.

Two implementations of the same product: "scaled_mm" (`torch._scaled_mm`, rowwise fp32 scales, bf16 out; Hopper
and Ada) and "reference" (dequantize both operands to fp32 and matmul; any device, used by the CPU tests).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_ROWS_PER_CHUNK = 4096  # weight rows quantized at a time: keeps the fp32 temporaries of a 6144x55296 layer small
_TINY = 1e-12  # amax floor: an all-zero row gets a tiny scale and quantizes to zeros, not NaN

IMPLS = ("auto", "scaled_mm", "reference")
# Layers no quantization touches: the embedders, the three shared modulation linears and the final layer. They are
# a small share of the FLOPs and sit where an error reaches every token (modulation) or the output directly.
DEFAULT_SKIP = (
    "img_in", "txt_in", "time_in", "guidance_in", "double_stream_modulation_img", "double_stream_modulation_txt",
    "single_stream_modulation", "final_layer",
)  # fmt: skip
# fp8 also keeps the MLP products in the compute dtype (module docstring). Suffix patterns, so that they also match
# the names inside one block ("img_mlp.0", "linear2") when a block is quantized on its own.
FP8_SKIP = (*DEFAULT_SKIP, "*img_mlp", "*txt_mlp", "*linear2")


def quantize_rowwise(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) -> e4m3 (..., K) and fp32 scales (...), one per row, so that the row's amax maps to 448. `amax`
    (...) replaces the rows' own amax (a shard of the input features quantized with its whole rows' scales)."""
    amax = x.abs().amax(dim=-1) if amax is None else amax  # abs is exact
    scale = amax.unsqueeze(-1).float().clamp(min=_TINY) / E4M3_MAX  # (..., 1)
    q = (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)  # clamp: fp32 rounding may land a hair over 448
    return q, scale.squeeze(-1)


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_rowwise` up to rounding, in fp32."""
    return q.float() * scale[..., None]


def scaled_mm_supported(device: torch.device | str) -> bool:
    """fp8 tensor cores with rowwise scales: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul_reference(x2d: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(M, K) activations x e4m3 (N, K) weights -> (M, N) in x's dtype: the fp32 oracle of the fp8 product."""
    x_q, x_scale = quantize_rowwise(x2d)
    return (dequantize_rowwise(x_q, x_scale) @ dequantize_rowwise(w_q, w_scale).t()).to(x2d.dtype)


def fp8_matmul_scaled_mm(x2d, w_q, w_scale, fast_accum: bool = True) -> torch.Tensor:
    """The same product on fp8 tensor cores: `torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=...)`.

    Rowwise scaling, as torch 2.13's meta check `_check_scaled_mm_sizes` states it (the 2-D scale layout dates
    from torch 2.5): a (M, K) row-major, b (K, N) column-major (the transpose of a contiguous (N, K) weight),
    K and N multiples of 16, scale_a (M, 1) and scale_b (1, N), both fp32 and contiguous. CUDA's rowwise kernel
    writes bf16 only, so other activation dtypes are cast back after.
    """
    x_q, x_scale = quantize_rowwise(x2d)
    out = torch._scaled_mm(
        x_q, w_q.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :], out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )  # fmt: skip
    return out.to(x2d.dtype)


class Fp8Linear(nn.Module):
    """A bias-free (or bf16-bias) Linear whose weight is stored as rowwise-scaled e4m3.

    `impl` is "scaled_mm", "reference" or "auto" (scaled_mm where the layer's device has fp8 tensor cores,
    re-resolved when the layer moves; `self.impl` holds the resolved choice). `fast_accum` lets the tensor cores
    accumulate without periodic fp32 promotion.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, impl: str = "auto",
                 fast_accum: bool = True, device=None):  # fmt: skip
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"Fp8Linear impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        if in_features % 16 or out_features % 16:
            raise ValueError(f"fp8 matmuls need both dims divisible by 16, got {in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.auto, self.fast_accum = impl == "auto", fast_accum
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.impl = self._resolve() if self.auto else impl

    def _resolve(self) -> str:
        return "scaled_mm" if scaled_mm_supported(self.weight.device) else "reference"

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts (`model.to(torch.bfloat16)`) leave the fp8 weight and fp32 scales alone."""
        quantized = {n: self._buffers[n] for n in ("weight", "weight_scale")}
        super()._apply(fn, recurse)
        for n, t in quantized.items():
            if self._buffers[n].dtype != t.dtype:
                self._buffers[n] = t.to(self._buffers[n].device)
        if self.auto:  # "auto" follows the device the layer lives on
            self.impl = self._resolve()
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, impl: str = "auto", fast_accum: bool = True,
                    amax: torch.Tensor | None = None) -> Fp8Linear:  # fmt: skip
        """The layer's weight quantized per row; `amax` (out,) replaces the rows' own amax (`quantize_rowwise`)."""
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, impl=impl,
                  fast_accum=fast_accum, device=w.device)  # fmt: skip
        for i in range(0, w.shape[0], _ROWS_PER_CHUNK):  # a chunk at a time: bounded fp32 temporaries
            rows = slice(i, i + _ROWS_PER_CHUNK)
            out.weight[rows], out.weight_scale[rows] = quantize_rowwise(w[rows], None if amax is None else amax[rows])
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)  # (M, K), M = all leading dims
        if self.impl == "scaled_mm":
            y = fp8_matmul_scaled_mm(x2d, self.weight, self.weight_scale, self.fast_accum)
        else:
            y = fp8_matmul_reference(x2d, self.weight, self.weight_scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, impl={self.impl}"


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Is module `name` under an entry of `skip`: a prefix ("final_layer") or a glob pattern ("*linear2")?"""
    return any(fnmatch.fnmatchcase(name, s) or fnmatch.fnmatchcase(name, s + ".*") for s in skip)


@torch.no_grad()
def quantize_transformer(model: nn.Module, skip: tuple[str, ...] = FP8_SKIP, *, impl: str = "auto",
                         fast_accum: bool = True) -> nn.Module:  # fmt: skip
    """Replace, in place, every nn.Linear whose dotted name is not under a `skip` entry (`skipped`) by an Fp8Linear.

    For Flux2 with the default FP8_SKIP these are the double blocks' qkv and proj (both streams) and the single
    blocks' linear1; skip=DEFAULT_SKIP quantizes every block Linear (faster, about 4% velocity error on klein-4B).
    Each bf16 weight is freed as soon as its fp8 copy exists, so the peak is the bf16 model plus one layer.
    Returns the model.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown fp8 impl {impl!r}; known: {', '.join(IMPLS)}")
    targets = [n for n, m in model.named_modules() if type(m) is nn.Linear and not skipped(n, skip)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child), impl, fast_accum))
    return model


def fp8_linears(model: nn.Module) -> list[str]:
    """Names of the Fp8Linear layers in `model`."""
    return [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
