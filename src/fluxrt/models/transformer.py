"""The FLUX.2 flow transformer (dev, klein 4B/9B, klein 9B KV): math only.

Module names are the official checkpoint keys (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`,
`final_layer.adaLN_modulation.1`, ...), so `flux2-dev.safetensors` loads with `strict=True, assign=True`.

Contract of `Flux2.forward`:
    x      (B, L_img, 128)  noisy image tokens, optionally followed by reference tokens
    x_ids  (B, L_img, 4)    (t, h, w, l) positions of those tokens
    timesteps (B,)          t in [0, 1], 1 = pure noise
    ctx    (B, L_txt, C)    text features;  ctx_ids (B, L_txt, 4)
    guidance (B,) or None   distilled guidance scale (dev only)
    -> (B, L_img, 128) velocity (noise - data) for every image-stream token.
The compute dtype is the dtype of `x`. No biases anywhere; LayerNorms have no affine parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TransformerConfig
from .attention import attention, qk_norm_rope, rms_norm, rope


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) t in [0, 1] -> (B, dim) sinusoidal embedding of 1000*t, cos half first, in t's dtype."""
    t = 1000.0 * t  # rounded in t's dtype, as the reference does (bf16 t -> bf16(1000 t))
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim, eps 1e-6, no affine parameters."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * layer_norm(x) + shift


class RMSNorm(nn.Module):
    """RMSNorm over head_dim with a learned `scale`; the normalisation runs in fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale)


class QKNorm(nn.Module):
    kernel: str | None = None  # the qk_norm_rope kernel of this block; fluxrt.accel sets it (None: the process's)

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, pe):
        """Both norms, then RoPE by pe: one `qk_norm_rope` call (a fused kernel where one is chosen)."""
        return qk_norm_rope(q, k, self.query_norm.scale, self.key_norm.scale, pe, self.kernel)


class SiLUActivation(nn.Module):
    """Gated SiLU: split [a | b] on the last dim, return silu(a) * b (the first half is gated)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.out_layer = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """Linear(H -> sets*3H) on silu(vec), chunked into `sets` (shift, scale, gate) triples of (B, 1, H)."""

    def __init__(self, hidden: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(hidden, 3 * sets * hidden, bias=False)

    def forward(self, vec: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1)
        return tuple(chunks[3 * i : 3 * i + 3] for i in range(self.sets))


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3H) laid out [q | k | v], heads contiguous -> three (B, heads, L, head_dim)."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


class RefKV:
    """Reference K/V of the klein-9B-KV forward, one (K, V) pair per block.

    "extract" (step 0): the joint sequence is [txt, ref, img]; txt and img queries attend to every key, reference
    queries only to reference keys; post-RoPE reference K and V are stored. "cached" (later steps): the sequence
    is [txt, img] and the stored reference K/V are inserted between the text and image keys.
    """

    def __init__(self, n_ref: int):
        self.n_ref = n_ref
        self.mode = "extract"
        self.kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, owner: nn.Module, q, k, v, n_txt: int) -> torch.Tensor:
        if self.mode == "extract":
            r = slice(n_txt, n_txt + self.n_ref)
            self.kv[owner] = (k[:, :, r], v[:, :, r])
            out_ref = attention(q[:, :, r], k[:, :, r], v[:, :, r])  # (B, n_ref, H)
            out = attention(torch.cat([q[:, :, :n_txt], q[:, :, r.stop :]], 2), k, v)
            return torch.cat([out[:, :n_txt], out_ref, out[:, n_txt:]], 1)
        k_ref, v_ref = self.kv[owner]
        k = torch.cat([k[:, :, :n_txt], k_ref, k[:, :, n_txt:]], 2)
        v = torch.cat([v[:, :, :n_txt], v_ref, v[:, :, n_txt:]], 2)
        return attention(q, k, v)


def joint_attention(owner, q, k, v, n_txt: int, kv: RefKV | None) -> torch.Tensor:
    """Attention of (already normed and rotated) q, k, v over the whole joint sequence (or the KV variant's)."""
    if kv is None:
        return attention(q, k, v)
    return kv.attend(owner, q, k, v, n_txt)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def qkv_heads(self, x: torch.Tensor, pe: torch.Tensor):
        """q, k, v heads of this stream's tokens, q and k normed and rotated by pe (this stream's positions)."""
        q, k, v = split_heads(self.qkv(x), self.heads)
        q, k = self.norm(q, k, pe)
        return q, k, v


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, 2 * mlp_hidden, bias=False), SiLUActivation(), nn.Linear(mlp_hidden, hidden, bias=False)
    )


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, one joint attention over [txt, img]."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.img_attn = SelfAttention(hidden, heads)
        self.img_mlp = _mlp(hidden, mlp_hidden)
        self.txt_attn = SelfAttention(hidden, heads)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def forward(self, img, txt, pe, mod_img, mod_txt, kv: RefKV | None = None):
        (img_shift1, img_scale1, _), _ = mod_img
        (txt_shift1, txt_scale1, _), _ = mod_txt
        n_txt = txt.shape[1]  # pe covers [txt, img]; RoPE is per token, so each stream takes its rows
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1), pe[:, :, n_txt:])
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1), pe[:, :, :n_txt])
        q, k, v = (torch.cat(p, dim=2) for p in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = joint_attention(self, q, k, v, n_txt, kv)  # (B, L_txt + L_img, H)
        return self.after_attention(img, txt, attn, mod_img, mod_txt)

    def after_attention(self, img, txt, attn, mod_img, mod_txt):
        """The block after its joint attention's output attn (B, L_txt + L_img, H): per stream, the gated output
        projection, then the gated MLP, each added to the stream."""
        (_, _, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (_, _, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]
        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Fused block over the joint sequence: linear1 = [q | k | v | gate | up], linear2 on [attn | mlp]."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads, self.hidden, self.mlp_hidden = heads, hidden, mlp_hidden
        self.linear1 = nn.Linear(hidden, 3 * hidden + 2 * mlp_hidden, bias=False)
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden, bias=False)
        self.norm = QKNorm(hidden // heads)
        self.mlp_act = SiLUActivation()

    def forward(self, x, pe, mod, n_txt: int, kv: RefKV | None = None):
        shift, scale, gate = mod
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden, 2 * self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = self.norm(q, k, pe)
        attn = joint_attention(self, q, k, v, n_txt, kv)  # (B, L, H)
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))


class LastLayer(nn.Module):
    """(shift, scale) = Linear(silu(vec)) with shift first; out = Linear((1 + scale) LN(x) + shift)."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


class Mods(NamedTuple):
    """Shared modulations of one forward: every block of a kind uses the same tensors."""

    img: tuple
    txt: tuple
    single: tuple


def _per_token(parts: list[tuple], lengths: list[int]) -> tuple:
    """Concatenate per-segment modulations (each (B, 1, H)) into per-token (B, sum(lengths), H) tensors."""
    if isinstance(parts[0][0], tuple):
        return tuple(_per_token([p[i] for p in parts], lengths) for i in range(len(parts[0])))
    return tuple(
        torch.cat([p[i].expand(-1, n, -1) for p, n in zip(parts, lengths)], dim=1) for i in range(len(parts[0]))
    )


class Flux2(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        h, m = cfg.hidden_size, cfg.mlp_hidden
        self.img_in = nn.Linear(cfg.in_channels, h, bias=False)
        self.time_in = MLPEmbedder(256, h)
        if cfg.use_guidance_embed:
            self.guidance_in = MLPEmbedder(256, h)
        self.txt_in = nn.Linear(cfg.context_in_dim, h, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, cfg.num_heads, m) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, cfg.num_heads, m) for _ in range(cfg.depth_single_blocks)
        )
        self.double_stream_modulation_img = Modulation(h, 2)
        self.double_stream_modulation_txt = Modulation(h, 2)
        self.single_stream_modulation = Modulation(h, 1)
        self.final_layer = LastLayer(h, cfg.in_channels)

    def embed_vec(self, timesteps: torch.Tensor, guidance: torch.Tensor | None, dtype) -> torch.Tensor:
        """(B,) t and guidance -> (B, H) conditioning vector; t and g are rounded to the compute dtype first."""
        vec = self.time_in(timestep_embedding(timesteps.to(dtype)))
        if self.cfg.use_guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedding: pass guidance (e.g. 4.0)")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype)))
        return vec

    def modulations(self, vec: torch.Tensor) -> Mods:
        return Mods(
            self.double_stream_modulation_img(vec),
            self.double_stream_modulation_txt(vec),
            self.single_stream_modulation(vec)[0],
        )

    def run_blocks(self, img, txt, pe, mods: Mods, kv: RefKV | None = None) -> torch.Tensor:
        """Double blocks on (img, txt), then single blocks on [txt, img]; returns the img part."""
        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mods.img, mods.txt, kv)
        n_txt = txt.shape[1]
        seq = torch.cat([txt, img], dim=1)  # (B, L_txt + L_img, H)
        for block in self.single_blocks:
            seq = block(seq, pe, mods.single, n_txt, kv)
        return seq[:, n_txt:]

    def forward(self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None, kv: RefKV | None = None):
        """Plain forward; with `kv` from `forward_kv_extract` this is the KV variant's cached step."""
        vec = self.embed_vec(timesteps, guidance, x.dtype)
        pe = rope(torch.cat([ctx_ids, x_ids], dim=1), self.cfg.axes_dim, self.cfg.theta)
        img = self.run_blocks(self.img_in(x), self.txt_in(ctx), pe, self.modulations(vec), kv)
        return self.final_layer(img, vec)  # (B, L_img, 128)

    def forward_kv_extract(self, x, x_ids, ref, ref_ids, timesteps, ctx, ctx_ids, guidance=None, ref_t=0.0):
        """klein-9B-KV step 0: references first in the image stream, modulated at t = ref_t, K/V cached.

        Returns the (B, L_img, 128) prediction for `x` and the `RefKV` to pass to later `forward` calls.
        """
        n_txt, n_ref, n_img = ctx.shape[1], ref.shape[1], x.shape[1]
        vec = self.embed_vec(timesteps, guidance, x.dtype)
        vec_ref = self.embed_vec(torch.full_like(timesteps, ref_t), guidance, x.dtype)
        mods, mods_ref = self.modulations(vec), self.modulations(vec_ref)
        mods = Mods(
            _per_token([mods_ref.img, mods.img], [n_ref, n_img]),
            mods.txt,
            _per_token([mods.single, mods_ref.single, mods.single], [n_txt, n_ref, n_img]),
        )
        kv = RefKV(n_ref)
        pe = rope(torch.cat([ctx_ids, ref_ids, x_ids], dim=1), self.cfg.axes_dim, self.cfg.theta)
        img = self.run_blocks(self.img_in(torch.cat([ref, x], dim=1)), self.txt_in(ctx), pe, mods, kv)
        kv.mode = "cached"
        return self.final_layer(img[:, n_ref:], vec), kv
