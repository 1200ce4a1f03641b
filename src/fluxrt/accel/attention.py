"""Named SDPA kernels for the model's one attention call, chosen from outside the model.

`set_attention_backend("cudnn")` (fluxrt.models.attention) routes every transformer attention through cuDNN's
fused attention, "flash" through FlashAttention-2, both as PyTorch ships them; "sdpa" lets PyTorch pick. The
kernels compute the same function (no mask, scale 1/sqrt(head_dim)) and differ only by bf16 rounding order.
They are called as aten ops (not inside an `sdpa_kernel` context) so torch.compile traces them without a break.
"""

from __future__ import annotations

import torch

from ..models.attention import register_attention_backend


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, L, D) through cuDNN's fused attention (CUDA only)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, L, D) through FlashAttention-2 (CUDA only, fp16/bf16)."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


KERNELS = {"cudnn": cudnn_attention, "flash": flash_attention}
for _name, _fn in KERNELS.items():
    register_attention_backend(_name, _fn)
