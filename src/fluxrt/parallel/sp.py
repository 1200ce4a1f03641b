"""Sequence parallelism for the flow transformer: Ulysses all-to-all and ring attention.

`SequenceParallel(model, group, attention="ulysses" | "ring")` wraps a built `Flux2`. Its forward has the model's
contract; inside, each of the n ranks of `group` runs the unchanged model on a slice of the tokens:

    rank r holds [txt shard r (pt tokens) | img shard r (pi tokens)],  pt = ceil(L_txt / n), pi = ceil(L_img / n)

Each stream is zero-padded at its end to n*pt (n*pi) tokens and cut into n contiguous shards, so the model's own
split at n_txt (double blocks -> single blocks -> drop the text) happens on every rank at its local pt. Every
operation but attention is per token (RoPE from each token's own ids, LayerNorm, MLP, projections) or per sample
(modulation), so only attention communicates. Attention is permutation-invariant over keys, so the order in which
shards are gathered does not matter.

Padding is exact and mask-free: padded tokens are computed like any token (zeros in, finite values out), but they
are never used as keys or values: Ulysses drops them after its all-to-all (one `index_select` on the gathered keys)
and ring attention slices each arriving K/V block to its valid rows. Padded queries produce values that are
discarded when the output is gathered. No mask enters any softmax, so results equal the unsharded model up to
floating-point summation order.

The parallel attention is installed as the attention backend "sequence-parallel" only while the wrapper's forward
runs; the model file never learns about it. Inference only: collectives here have no autograd.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..models.attention import attention, attention_backend, register_attention_backend
from ..models.transformer import SelfAttention, SingleStreamBlock

MODES = ("ulysses", "ring")


@dataclass(frozen=True)
class Layout:
    """Token layout of one sharded forward: `n_txt` text and `n_img` image(+reference) tokens over `world` ranks."""

    n_txt: int
    n_img: int
    world: int

    @property
    def pt(self) -> int:
        return math.ceil(self.n_txt / self.world)

    @property
    def pi(self) -> int:
        return math.ceil(self.n_img / self.world)

    @property
    def padded(self) -> bool:
        return self.pt * self.world != self.n_txt or self.pi * self.world != self.n_img

    def valid(self, src: int) -> tuple[int, int]:
        """(valid text, valid image) token counts in the shard of rank `src`; the rest is padding."""
        vt = min(max(self.n_txt - src * self.pt, 0), self.pt)
        vi = min(max(self.n_img - src * self.pi, 0), self.pi)
        return vt, vi

    def key_index(self, device) -> torch.Tensor:
        """Positions of the valid tokens in the n local sequences laid end to end in rank order (cached)."""
        return _key_index(self, torch.device(device))


@functools.lru_cache(maxsize=16)
def _key_index(layout: Layout, device: torch.device) -> torch.Tensor:
    local, idx = layout.pt + layout.pi, []
    for src in range(layout.world):
        vt, vi = layout.valid(src)
        idx += [torch.arange(vt) + src * local, torch.arange(vi) + src * local + layout.pt]
    return torch.cat(idx).to(device)


def shard_tokens(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """(B, L, C) -> (B, ceil(L/world), C): zero-pad dim 1 to a multiple of `world`, return contiguous shard `rank`."""
    p = math.ceil(t.shape[1] / world)
    t = torch.nn.functional.pad(t, (0, 0, 0, p * world - t.shape[1]))
    return t[:, rank * p : (rank + 1) * p]


def gather_tokens(t: torch.Tensor, n_total: int, group) -> torch.Tensor:
    """(B, p, C) shards of every rank of `group` -> (B, n_total, C) on every rank, padding dropped."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)[:, :n_total]


def _all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk r of the result came from rank r."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(S, B, h, Ls, D) sequence shards -> (S, B, h/n, n*Ls, D) head shards (all tokens of this rank's heads)."""
    n = dist.get_world_size(group)
    s, b, h, ls, d = x.shape
    send = x.reshape(s, b, n, h // n, ls, d).permute(2, 0, 1, 3, 4, 5).contiguous()  # (n, S, B, h/n, Ls, D)
    recv = _all_to_all(send, group)  # recv[r] = rank r's tokens of my heads
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(s, b, h // n, n * ls, d)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, h/n, n*Ls, D) head shards -> (B, h, Ls, D) sequence shards; the inverse of `seq_to_heads`."""
    n = dist.get_world_size(group)
    b, hl, length, d = x.shape
    send = x.reshape(b, hl, n, length // n, d).permute(2, 0, 1, 3, 4).contiguous()  # (n, B, h/n, Ls, D)
    recv = _all_to_all(send, group)  # recv[r] = my tokens of rank r's heads
    return recv.transpose(0, 1).reshape(b, n * hl, length // n, d)


def ulysses_attention(q, k, v, layout: Layout, group, inner: str = "sdpa", key_index=None) -> torch.Tensor:
    """(B, h, Ls, D) local q, k, v -> (B, h, Ls, D): all-to-all to head shards, full attention, all-to-all back.

    The local attention runs with the backend `inner`; padded keys are dropped before it (exact, no mask).
    """
    q, k, v = seq_to_heads(torch.stack([q, k, v]), group).unbind(0)  # each (B, h/n, n*Ls, D)
    if layout.padded:
        idx = layout.key_index(q.device) if key_index is None else key_index
        k, v = k.index_select(2, idx), v.index_select(2, idx)
    with attention_backend(inner):
        out = attention(q, k, v)  # (B, n*Ls, h/n * D)
    return heads_to_seq(out.unflatten(-1, (q.shape[1], -1)).transpose(1, 2), group)


def block_attention(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, h, Lq, D), (B, h, Lk, D) -> output (B, h, Lq, D) fp32 and log-sum-exp (B, h, Lq) fp32, scale 1/sqrt(D).

    bf16/fp16 on CUDA use the fused flash kernel (it returns the LSE); anything else is plain fp32 math.
    """
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out.float(), lse[..., : q.shape[2]].float()
    s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, h, Lq, Lk)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ v.float(), lse


def merge_blocks(out, lse, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax: combine two partial attentions over disjoint key sets (fp32; lse = -inf means empty)."""
    new = torch.logaddexp(lse, lse_b)
    out = out * torch.exp(lse - new)[..., None] + out_b * torch.exp(lse_b - new)[..., None]
    return out, new


def _ring_pass(t: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Start sending `t` to the next rank of the ring and receiving the previous rank's into a new buffer."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = (dist.get_global_rank(group, (r + d) % n) for d in (1, -1))
    recv = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    return recv, dist.batch_isend_irecv(ops)


def _valid_kv(kv: torch.Tensor, layout: Layout, src: int) -> torch.Tensor:
    """(2, B, h, pt+pi, D) K/V block of rank `src` -> its valid rows only (text rows, then image rows)."""
    vt, vi = layout.valid(src)
    if (vt, vi) == (layout.pt, layout.pi):
        return kv
    return torch.cat([kv[:, :, :, :vt], kv[:, :, :, layout.pt : layout.pt + vi]], dim=3)


def ring_attention(q, k, v, layout: Layout, group) -> torch.Tensor:
    """(B, h, Ls, D) local q, k, v -> (B, h, Ls, D): K/V blocks travel the ring, softmax accumulated online in fp32.

    Step s attends to the block of rank (r - s) mod n while the next block is in flight.
    """
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    kv = torch.stack([k, v]).contiguous()  # (2, B, h, Ls, D): one message per step
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    for step in range(n):
        nxt, works = _ring_pass(kv, group) if step < n - 1 else (None, [])
        kb, vb = _valid_kv(kv, layout, (rank - step) % n).unbind(0)
        if kb.shape[2]:  # a block of padding only adds nothing
            out, lse = merge_blocks(out, lse, *block_attention(q, kb, vb))
        for w in works:
            w.wait()
        kv = nxt
    return out.to(q.dtype)


@dataclass(frozen=True)
class _Call:
    layout: Layout
    group: object
    mode: str
    inner: str
    key_index: torch.Tensor | None = None  # Ulysses' valid keys, made outside compiled blocks (an lru_cache)


_CALLS: list[_Call] = []  # the sharded forward in progress (a stack, so nested wrappers would also work)


def _sp_backend(q, k, v) -> torch.Tensor:
    """The "sequence-parallel" attention backend: dispatches to the mode of the forward in progress."""
    if not _CALLS:
        raise RuntimeError("the 'sequence-parallel' attention backend only runs inside SequenceParallel.forward")
    c = _CALLS[-1]
    if q.shape[2] != c.layout.pt + c.layout.pi or k.shape[2] != q.shape[2]:
        raise RuntimeError(
            f"sequence-parallel attention expected {c.layout.pt + c.layout.pi} local tokens, got q {q.shape[2]}, "
            f"k {k.shape[2]} (the klein KV-cache forward is not supported under sequence parallelism)"
        )
    if c.mode == "ring":
        return ring_attention(q, k, v, c.layout, c.group)
    return ulysses_attention(q, k, v, c.layout, c.group, c.inner, c.key_index)


register_attention_backend("sequence-parallel", _sp_backend)


@contextlib.contextmanager
def _installed(call: _Call):
    _CALLS.append(call)
    try:
        with attention_backend("sequence-parallel"):
            yield
    finally:
        _CALLS.pop()


def local_heads(model: nn.Module) -> int:
    """Attention heads each rank computes (fewer than cfg.num_heads after tensor parallelism)."""
    return next(m.heads for m in model.modules() if isinstance(m, (SelfAttention, SingleStreamBlock)))


def check_divisible(count: int, world: int, what: str) -> None:
    """Raise a ValueError naming both numbers unless `world` divides `count`."""
    if count % world:
        raise ValueError(f"{what} {count} is not divisible by the parallel world size {world}")


class SequenceParallel(nn.Module):
    """Run a `Flux2` with its tokens split over the ranks of `group`; same forward contract, same result.

    attention: "ulysses" (all-to-all over heads; needs the local head count divisible by the group size) or
    "ring" (K/V passed around the ring; any head count, less memory per rank for very long sequences).
    inner: the attention backend Ulysses uses for its local full attention ("sdpa", "math", or a registered one).
    Every rank passes the same full inputs and gets the same full (B, L_img, 128) output.
    """

    def __init__(self, model: nn.Module, group=None, attention: str = "ulysses", inner: str = "sdpa"):
        super().__init__()
        if attention not in MODES:
            raise ValueError(f"unknown sequence-parallel attention {attention!r}; known: {', '.join(MODES)}")
        self.model, self.mode, self.inner = model, attention, inner
        self.group = group if group is not None else dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if attention == "ulysses":
            check_divisible(local_heads(model), self.world, "Ulysses: attention heads per rank")

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None, kv=None):
        """Same contract as `Flux2.forward` (x (B, L_img, 128) -> (B, L_img, 128)); `kv` is not supported."""
        if kv is not None:
            raise NotImplementedError("the klein KV-cache forward is not supported under sequence parallelism")
        layout = Layout(ctx.shape[1], x.shape[1], self.world)
        x, x_ids, ctx, ctx_ids = (shard_tokens(t, self.rank, self.world) for t in (x, x_ids, ctx, ctx_ids))
        keys = layout.key_index(x.device) if layout.padded and self.mode == "ulysses" else None
        with _installed(_Call(layout, self.group, self.mode, self.inner, keys)):
            out = self.model(x, x_ids, timesteps, ctx, ctx_ids, guidance=guidance)  # (B, pi, 128)
        return gather_tokens(out, layout.n_img, self.group)

    def forward_kv_extract(self, *args, **kwargs):
        raise NotImplementedError("the klein KV-cache forward is not supported under sequence parallelism")
