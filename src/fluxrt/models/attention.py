"""Rotary position embedding and the one attention function every model uses.

`rope(ids, axes_dim, theta)` turns (B, L, n_axes) integer positions into a (B, 1, L, head_dim/2, 2) table of
(cos, sin); `apply_rope` rotates interleaved pairs (2k, 2k+1) of q and k in fp32.
`attention(q, k, v)` takes (B, heads, L, head_dim) tensors and returns (B, L, heads*head_dim); its backend
is chosen with `set_attention_backend` (outside the model), so every backend is tested against "sdpa".
`qk_norm_rope(q, k, q_scale, k_scale, table, kernel=None)` is the RMSNorm of q and k (`rms_norm`) followed by
`apply_rope`; its kernel is chosen outside the model, per call site (`kernel`, which a block's QKNorm passes from
its `kernel` attribute, set by fluxrt.accel) or for the process (`set_norm_rope_kernel`), and every kernel is
tested against "reference", these very ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """(B, L, n_axes) positions -> (B, 1, L, sum(axes_dim)/2, 2) fp32 (cos, sin) of each pair's angle."""
    # float64 angles where the device has them (as the reference FLUX code does), then fp32 tables.
    f64 = ids.device.type not in ("mps",)
    dtype = torch.float64 if f64 else torch.float32
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)  # (dim/2,)
        angles.append(ids[..., axis].to(dtype)[..., None] * omega)  # (B, L, dim/2)
    phi = torch.cat(angles, dim=-1)  # (B, L, head_dim/2)
    return torch.stack([torch.cos(phi), torch.sin(phi)], dim=-1).unsqueeze(1).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, heads, L, D) by table (B, 1, L, D/2, 2); fp32 math, x's dtype out."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, L, D/2) each
    cos, sin = table.unbind(-1)
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).type_as(x)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, rounded to x's dtype, then times `scale` (the QK-norm of every block)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * scale


def _norm_rope_reference(q, k, q_scale, k_scale, table):
    return (apply_rope(rms_norm(q, q_scale).to(q.dtype), table),
            apply_rope(rms_norm(k, k_scale).to(k.dtype), table))  # fmt: skip


class Choice:
    """Named implementations of one function and the one a process uses, chosen outside the model."""

    def __init__(self, what: str, first: str, fn: Callable):
        self.what, self.fns, self.active = what, {first: fn}, first

    def register(self, name: str, fn: Callable) -> None:
        self.fns[name] = fn

    def check(self, name: str) -> None:
        if name not in self.fns:
            raise ValueError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self.fns))}")

    def set(self, name: str) -> None:
        self.check(name)
        self.active = name

    @contextlib.contextmanager
    def use(self, name: str):
        """Temporarily switch to `name`."""
        old = self.active
        self.set(name)
        try:
            yield
        finally:
            self.active = old


NORM_ROPE = Choice("norm-rope kernel", "reference", _norm_rope_reference)
register_norm_rope_kernel = NORM_ROPE.register  # fn(q, k, q_scale, k_scale, table) -> (q, k); used by fluxrt.accel
set_norm_rope_kernel = NORM_ROPE.set
norm_rope_kernel = NORM_ROPE.use


def norm_rope_kernel_name() -> str:
    return NORM_ROPE.active


def qk_norm_rope(q, k, q_scale, k_scale, table, kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) q and k -> RMSNorm (eps 1e-6, learned scales), then RoPE by table (B, 1, L, D/2, 2); q's dtype.
    `kernel` names a registered kernel; None: the process's (`set_norm_rope_kernel`, "reference" by default)."""
    return NORM_ROPE.fns[kernel or NORM_ROPE.active](q, k, q_scale, k_scale, table)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(d))V in fp32: the readable oracle the fast backends are tested against."""
    w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v.float()).type_as(q)


ATTENTION = Choice("attention backend", "sdpa", _sdpa)
ATTENTION.register("math", _math)
register_attention_backend = ATTENTION.register  # fn(q, k, v) -> (B, heads, L, D); used by accel (e.g. cuDNN's)
set_attention_backend = ATTENTION.set
attention_backend = ATTENTION.use


def attention_backends() -> dict[str, Callable]:
    """The registered kernels by name, each `(q, k, v) -> out` on (B, H, L, D) tensors (a copy of the registry)."""
    return dict(ATTENTION.fns)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, D) x (B, H, Lk, D) -> (B, Lq, H*D), no mask, scale 1/sqrt(D)."""
    out = ATTENTION.fns[ATTENTION.active](q, k, v)  # (B, H, Lq, D)
    return out.transpose(1, 2).flatten(2)
