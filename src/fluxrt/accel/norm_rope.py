"""QK-norm and RoPE in one Triton kernel, chosen from outside the model for its `qk_norm_rope` call.

Registered kernels "triton" and "triton-blhd" (fluxrt.models.attention's norm-rope registry): a block runs one when
its QKNorm's `kernel` names it (`compile_transformer` sets "triton-blhd" on CUDA models; `use_fused_kernels`), or
the whole process with `set_norm_rope_kernel`. Per (batch, head, block of tokens) one program reads the head's rows
of q (then of k) where the projection left them (any strides, last dim contiguous), RMS-normalises each row in
fp32, rounds to the compute dtype, multiplies by the learned scale and rounds again (the reference's two rounding
points), rotates the interleaved pairs by the (cos, sin) table in fp32 and writes the row once. Compiled, inductor
made this a looped reduction at ~1 TB/s; the fused kernel reads and writes each element once (~3.4 TB/s on an
H200). "triton-blhd" writes the result in (B, L, H, D) memory order (returned as the same (B, H, L, D) view), the
order the attention kernels read best; "triton" writes (B, H, L, D) contiguous. `fluxrt::norm_rope_send` writes q,
k (and copies v) straight into a Ulysses all-to-all's send buffer (`fluxrt.parallel.sp.pack_qkv`).

It computes the reference's function; the results differ only by fp32 summation order in the mean and by fused
multiply-adds in the rotation (tests: within one bf16 rounding step of the reference). CUDA only; on any other
device the registered kernels run the reference. Under torch.compile the kernels are `torch.library.triton_op`s,
which inductor calls without a graph break. `TRITON_INTERPRET=1` (set before this module is imported) runs the
same kernel on CPU tensors, which is how the CPU tests check it.
"""

from __future__ import annotations

import importlib.util

import torch

from ..models.attention import _norm_rope_reference, register_norm_rope_kernel

EPS = 1e-6  # the QK-norm's epsilon (fluxrt.models.attention.rms_norm)
BLOCK_L = 16  # token rows per program: 16 x 128 elements of q


AVAILABLE = importlib.util.find_spec("triton") is not None  # the kernels run on CUDA tensors where it is installed
_loaded: list = []


def kernels():
    """fluxrt.accel.norm_rope_kernels, imported (Triton, the triton_ops) on first use; `use_fused_kernels` imports
    it before anything is traced, so compiled code only reads `_loaded`."""
    if not _loaded:
        from . import norm_rope_kernels

        _loaded.append(norm_rope_kernels)
    return _loaded[0]


def check_inputs(x: torch.Tensor, scale: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The table the kernel reads (its last two dims made dense); a ValueError names what does not fit."""
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"norm_rope_triton needs (B, H, L, D) with a contiguous last dim, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")  # fmt: skip
    B, _, L, D = x.shape
    if D % 2 or D & (D - 1):
        raise ValueError(f"norm_rope_triton needs a power-of-two head dim, got {D}")
    if tuple(scale.shape) != (D,):
        raise ValueError(f"norm scale of shape {tuple(scale.shape)} does not match head dim {D}")
    if table.dim() != 5 or table.shape[0] not in (1, B) or tuple(table.shape[2:]) != (L, D // 2, 2):
        raise ValueError(f"RoPE table of shape {tuple(table.shape)} does not fit q of shape {tuple(x.shape)}")
    if table.dtype != torch.float32:
        table = table.float()
    if table.stride(-1) != 1 or table.stride(-2) != 2:
        table = table.contiguous()
    return table


def prepare(q, k, q_scale, k_scale, table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q's and k's (scale, scale, table) as the kernel reads them, both checked (`check_inputs`)."""
    table = check_inputs(q, q_scale, table)
    check_inputs(k, k_scale, table)
    return q_scale.contiguous(), k_scale.contiguous(), table


def send_buffer(q, k, v, q_scale, k_scale, table, n: int) -> torch.Tensor:
    """q, k normed and rotated, v copied, into Ulysses' (n, 3, B, H/n, L, D) send buffer by the kernel (CUDA)."""
    return kernels().send_op(q, k, v, *prepare(q, k, q_scale, k_scale, table), n)


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels run on these: CUDA tensors, Triton installed, and no gradient wanted (they have no backward;
    a model trained after `compile_transformer` falls back to the reference ops, which autograd follows)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return AVAILABLE and tensors[0].device.type == "cuda" and not grad


def _kernel(blhd: bool):
    def norm_rope_triton(q, k, q_scale, k_scale, table):
        if not usable(q, k, q_scale, k_scale):
            return _norm_rope_reference(q, k, q_scale, k_scale, table)
        q_scale, k_scale, table = prepare(q, k, q_scale, k_scale, table)
        op = kernels().rows_op
        return op(q, q_scale, table, blhd), op(k, k_scale, table, blhd)

    return norm_rope_triton


KERNELS = {"triton": _kernel(False), "triton-blhd": _kernel(True)}
for _name, _fn in KERNELS.items():
    register_norm_rope_kernel(_name, _fn)
