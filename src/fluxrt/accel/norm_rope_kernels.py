"""The Triton side of fluxrt.accel.norm_rope: the kernel, its launchers and the `torch.library.triton_op`s
(`fluxrt::norm_rope`, `fluxrt::norm_rope_send`). Imported on first use on CUDA (or by a test), not with
fluxrt.accel: Triton and defining triton_ops (which imports torch's inductor) cost over a second.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .norm_rope import BLOCK_L, EPS, check_inputs, prepare


@triton.jit
def _round(x, dtype):
    """fp32 -> dtype (round to nearest even, named: Triton's interpreter would truncate) -> fp32."""
    return x.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)


@triton.jit  # named triton_*: profiles (bench/profile_step.classify) bin it with inductor's Triton kernels
def triton_norm_rope_kernel(x_ptr, scale_ptr, table_ptr, out_ptr, L, sxb, sxh, sxl, stb, stl, off0, hn, sor, sob,
                            soh, sol, own, own_ptr, oob, ooh, ool, eps, D: tl.constexpr,
                            BLOCK: tl.constexpr, NORM: tl.constexpr, OWN: tl.constexpr):  # fmt: skip
    # head h is written at chunk h // hn, head h % hn of it (Ulysses' send layout; hn = H: plain strides); with
    # OWN, chunk `own` goes to own_ptr instead, with (batch, head, token) strides oob, ooh, ool
    pid_l, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    mask = rows[:, None] < L
    x = tl.load(x_ptr + b * sxb + h * sxh + rows[:, None] * sxl + cols[None, :], mask=mask, other=0.0)
    if NORM:
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
        y = _round(xf * inv[:, None], x.dtype)  # rounded to the compute dtype, as the reference
        s = tl.load(scale_ptr + cols).to(tl.float32)
        y = _round(y * s[None, :], out_ptr.dtype.element_ty)  # times the scale, rounded again
        t = tl.load(table_ptr + b * stb + rows[:, None] * stl + cols[None, :], mask=mask, other=0.0)
        cos, sin = tl.split(tl.reshape(t, (BLOCK, D // 2, 2)))  # the table's (cos, sin) per pair
        y0, y1 = tl.split(tl.reshape(y, (BLOCK, D // 2, 2)))  # the pairs (2i, 2i+1)
        out = tl.reshape(tl.join(cos * y0 - sin * y1, sin * y0 + cos * y1), (BLOCK, D))
        out = out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    else:  # v: copied to its place unchanged
        out = x.to(out_ptr.dtype.element_ty)
    r = h // hn
    if OWN and r == own:
        dst = own_ptr + b * oob + (h - r * hn) * ooh + rows[:, None] * ool + cols[None, :]
    else:
        dst = out_ptr + off0 + r * sor + b * sob + (h - r * hn) * soh + rows[:, None] * sol + cols[None, :]
    tl.store(dst, out, mask=mask)


def _launch(x, scale, table, out, launch, off0: int = 0, hn: int | None = None, sor: int = 0,
            strides: tuple[int, int, int] | None = None, norm: bool = True, own: int = -1,
            own_out: torch.Tensor | None = None) -> None:  # fmt: skip
    """Run the kernel through `launch` (the kernel itself, or `wrap_triton` of it): x's rows normed and rotated (or
    copied: norm=False) into `out` at element offset off0, with (batch, head, token) strides `strides` (default
    out's own) and head h at chunk h // hn (stride sor); chunk `own` into `own_out` (B, hn, L, D) instead."""
    B, H, L, D = x.shape
    sob, soh, sol = strides or out.stride()[:3]
    stb = table.stride(0) if table.shape[0] > 1 else 0  # one table for the whole batch broadcasts
    grid = (triton.cdiv(L, BLOCK_L), H, B)
    redirect = own_out is not None
    if not redirect:  # a tensor of its own for the unused pointer: torch.compile's analysis of what the kernel
        own_out = out.new_empty(0)  # writes must not see `out` passed twice
    launch[grid](x, scale, table, out, L, x.stride(0), x.stride(1), x.stride(2), stb, table.stride(2), off0,
                 hn or H, sor, sob, soh, sol, own, own_out, *(own_out.stride()[:3] if redirect else (0, 0, 0)), EPS,
                 D=D, BLOCK=BLOCK_L, NORM=norm, OWN=redirect)  # fmt: skip


def _rows(x, scale, table, blhd: bool, launch) -> torch.Tensor:
    """x normed and rotated into a new (B, H, L, D) tensor, laid out (B, L, H, D) when blhd."""
    B, H, L, D = x.shape
    if blhd:
        out = torch.empty((B, L, H, D), device=x.device, dtype=x.dtype).transpose(1, 2)
    else:
        out = torch.empty((B, H, L, D), device=x.device, dtype=x.dtype)
    _launch(x, scale, table, out, launch)
    return out


def _send(q, k, v, q_scale, k_scale, table, n: int, launch, own: int = -1, own_out=None, send=None) -> torch.Tensor:
    """q and k normed and rotated, v copied, straight into Ulysses' send buffer (n, 3, B, H/n, L, D): chunk r holds
    heads r*H/n ... of each, the layout `fluxrt.parallel.sp.pack_send` makes from the stacked q, k, v. own, own_out:
    chunk `own` is written to `own_out` (3, B, H/n, L, D), any strides with a contiguous last dim, instead (where
    the exchange lands it: no copy of it after); the send buffer's chunk `own` is then left unwritten. send: the
    buffer to write (any strides with a contiguous last dim: a run of tokens of a bigger one); default a new one."""
    B, H, L, D = q.shape
    for name, t, want in (("own chunk", own_out, (3, B, H // n, L, D)), ("send buffer", send, (n, 3, B, H // n, L, D))):
        if t is not None and (tuple(t.shape) != want or t.stride(-1) != 1):
            raise ValueError(f"{name} of shape {tuple(t.shape)} strides {t.stride()}: expected {want} with a "
                             f"contiguous last dim")  # fmt: skip
    if send is None:
        send = torch.empty((n, 3, B, H // n, L, D), device=q.device, dtype=q.dtype)
    st = send.stride()
    for i, (x, scale) in enumerate(((q, q_scale), (k, k_scale), (v, q_scale))):
        _launch(x, scale, table, send, launch, off0=i * st[1], hn=H // n, sor=st[0], strides=(st[2], st[3], st[4]),
                norm=i < 2, own=own, own_out=None if own_out is None else own_out[i])  # fmt: skip
    return send


def norm_rope_rows(x: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, blhd: bool = False) -> torch.Tensor:
    """One tensor through the kernel, launched directly (eager; also on CPU tensors under TRITON_INTERPRET=1)."""
    return _rows(x, scale.contiguous(), check_inputs(x, scale, table), blhd, triton_norm_rope_kernel)


def norm_rope_send(q, k, v, q_scale, k_scale, table, n: int, own: int = -1, own_out=None, send=None) -> torch.Tensor:
    """`_send`, launched directly (eager; also on CPU tensors under TRITON_INTERPRET=1)."""
    return _send(q, k, v, *prepare(q, k, q_scale, k_scale, table), n, triton_norm_rope_kernel, own, own_out, send)


@triton_op("fluxrt::norm_rope", mutates_args=())
def _norm_rope_op(x: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, blhd: bool) -> torch.Tensor:
    return _rows(x, scale, table, blhd, wrap_triton(triton_norm_rope_kernel))


@triton_op("fluxrt::norm_rope_send", mutates_args=())
def _norm_rope_send_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                       k_scale: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:  # fmt: skip
    return _send(q, k, v, q_scale, k_scale, table, n, wrap_triton(triton_norm_rope_kernel))


rows_op = torch.ops.fluxrt.norm_rope  # (x, scale, table, blhd) -> x normed and rotated
send_op = torch.ops.fluxrt.norm_rope_send  # (q, k, v, q_scale, k_scale, table, n) -> Ulysses' send buffer
