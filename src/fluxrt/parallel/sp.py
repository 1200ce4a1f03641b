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
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..accel import norm_rope
from ..accel.cache import share_step_cache
from ..models.attention import attention, attention_backend, register_attention_backend
from ..models.transformer import DoubleStreamBlock, SelfAttention, SingleStreamBlock, modulate, split_heads
from .copy_engine import CopyEngineExchange, make_exchange

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


def _all_to_all(send: torch.Tensor, group, exchange: CopyEngineExchange | None = None) -> torch.Tensor:
    """Start sending chunk i of dim 0 to rank i; chunk r of the result will hold rank r's. Returns at once: the
    result may only be read after `_wait`, and work issued in between runs while the data is in flight. The
    functional ops are called directly so that torch.compile keeps this order (the `funcol` wrappers wait at once
    when traced). `send` is contiguous: compiled, the permute that lays it out is fused into the kernel that
    makes it, and the copy-engine transport (`exchange`) packs it with a plain device-to-device copy."""
    if exchange is not None:
        return exchange.start(send)
    split = [send.shape[0] // dist.get_world_size(group)] * dist.get_world_size(group)
    return torch.ops._c10d_functional.all_to_all_single(send, split, split, group.group_name)


def _wait(t: torch.Tensor, exchange: CopyEngineExchange | None = None) -> torch.Tensor:
    return exchange.wait(t) if exchange is not None else torch.ops._c10d_functional.wait_tensor(t)


def pack_send(x: torch.Tensor, n: int) -> torch.Tensor:
    """(S, B, h, Ls, D) sequence shards -> the send buffer (n, S, B, h/n, Ls, D): chunk r holds rank r's heads."""
    s, b, h, ls, d = x.shape
    return x.reshape(s, b, n, h // n, ls, d).permute(2, 0, 1, 3, 4, 5).contiguous()


DIRECT_SEND = [True]  # benchmarks switch it off (bench/parallel.py :stack) to time the kernel without it


def pack_qkv(norm, q, k, v, pe, n: int) -> torch.Tensor:
    """A block's q, k (normed, rotated by pe) and v -> the send buffer of `pack_send`; where the block's QK-norm runs
    fluxrt.accel.norm_rope's fused kernel (on CUDA), the kernel writes them into the buffer directly."""
    qs, ks = norm.query_norm.scale, norm.key_norm.scale
    if DIRECT_SEND[0] and norm.kernel in norm_rope.KERNELS and norm_rope.usable(q, k, v, qs, ks):
        return norm_rope.send_buffer(q, k, v, qs, ks, pe, n)
    return pack_send(torch.stack([*norm(q, k, pe), v]), n)


OWN_LANDED = [True]  # benchmarks switch it off (bench/parallel.py :ceowncopy) to time the own chunk's copy again
TOKEN_MAJOR = [True]  # `send_own_landed`'s layout; off: head-major, as the other paths land (bench :ceheadmajor)


def send_qkv(norm, q, k, v, pe, group, exchange: CopyEngineExchange | None = None) -> tuple[torch.Tensor, bool]:
    """A block's q, k, v -> (all-to-all in flight to their head shards, whether it lands token-major): where
    `own_landed` holds `send_own_landed`, else `send_to_heads(pack_qkv(...))`. Pass both to `ulysses_local`."""
    if own_landed(exchange, [norm], q):
        return send_own_landed([(norm, q, k, v, pe)], dist.get_world_size(group), exchange), TOKEN_MAJOR[0]
    return send_to_heads(pack_qkv(norm, q, k, v, pe, dist.get_world_size(group)), group, exchange), False


def own_landed(exchange: CopyEngineExchange | None, norms, x: torch.Tensor) -> bool:
    """Whether `send_own_landed` serves blocks with these QK-norms on activations like `x`: the copy-engine
    transport pushing q, k, v into head order, and the fused kernel running for every norm (CUDA), or no GPU at
    all (the gloo tests, where the reference ops make the same writes)."""
    if exchange is None or not (exchange.push and exchange.land and OWN_LANDED[0] and DIRECT_SEND[0]):
        return False
    return not x.is_cuda or all(_kernel_runs(norm, x) for norm in norms)


def _kernel_runs(norm, x: torch.Tensor) -> bool:
    return norm.kernel in norm_rope.KERNELS and norm_rope.usable(x)


@torch.compiler.disable
def send_own_landed(parts, n: int, exchange: CopyEngineExchange) -> torch.Tensor:
    """(norm, q, k, v, pe) per run of consecutive local tokens (one for a single block; a double block's text, then
    its image tokens) -> the all-to-all of their q, k, v in flight. The fused kernel writes this rank's own heads
    straight where they land in its receive buffer (`CopyEngineExchange.landing`) and the other ranks' into the
    send buffer, each run at its token offset, so nothing joins the runs, stacks q, k, v or copies the own chunk
    (which ran as an SM kernel beside nothing). Outside compiled code: the receive buffer is the exchange's, and
    the kernel is launched eagerly (in a CUDA graph its launch is captured like any other).

    Token-major (`TOKEN_MAJOR`, the default): each chunk is laid out (3, B, Ls, h/n, D) and q, k, v land as
    (3, B, n, Ls, h/n, D), so each is a (B, h/n, L, D) view of (B, L, h/n, D) memory: the order the attention
    kernel reads best, and whose output it then writes in the (B, L, h/n * D) order the output's exchange sends,
    with no transpose copy between them. Head-major: (3, B, h/n, n, Ls, D), as `send_to_heads` lands them."""
    b, h, _, d = parts[0][1].shape
    runs, hl, tm = [p[1].shape[2] for p in parts], h // n, TOKEN_MAJOR[0]
    shape = (n, 3, b, sum(runs), hl, d) if tm else (n, 3, b, hl, sum(runs), d)
    own = exchange.landing(shape, parts[0][1].dtype, parts[0][1].device, dim=2 if tm else 3)
    own = own.transpose(2, 3) if tm else own  # (3, B, h/n, L, D) either way, as the kernel addresses it
    if all(_kernel_runs(p[0], p[1]) for p in parts):
        send, start = torch.empty(shape, dtype=own.dtype, device=own.device), 0
        heads_first = send.transpose(3, 4) if tm else send  # (n, 3, B, h/n, L, D)
        for (norm, q, k, v, pe), length in zip(parts, runs, strict=True):
            cut = slice(start, start + length)
            norm_rope.kernels().norm_rope_send(q, k, v, norm.query_norm.scale, norm.key_norm.scale, pe, n,
                                               exchange.rank, own[:, :, :, cut], heads_first[:, :, :, :, cut])  # fmt: skip
            start += length
    else:
        qkv = [(*norm(q, k, pe), v) for norm, q, k, v, pe in parts]
        send = pack_send(torch.stack([torch.cat(t, dim=2) for t in zip(*qkv, strict=True)]), n)
        send = send.transpose(3, 4).contiguous() if tm else send  # (n, 3, B, Ls, h/n, D)
        own.copy_(send[exchange.rank].transpose(2, 3) if tm else send[exchange.rank])
    return exchange.start(send, dim=2 if tm else 3, own_written=True)


def seq_to_heads_start(x: torch.Tensor, group, exchange: CopyEngineExchange | None = None) -> torch.Tensor:
    """(S, B, h, Ls, D) sequence shards -> all-to-all in flight; `seq_to_heads_finish` lays out what arrives."""
    return send_to_heads(pack_send(x, dist.get_world_size(group)), group, exchange)


def send_to_heads(send: torch.Tensor, group, exchange: CopyEngineExchange | None = None) -> torch.Tensor:
    """A `pack_send` buffer -> all-to-all in flight (`seq_to_heads_start` after the packing)."""
    if exchange is not None and exchange.land:  # lands as (S, B, h/n, n, Ls, D): see `seq_to_heads_finish`
        return exchange.start(send, dim=3)
    return _all_to_all(send, group, exchange)


def seq_to_heads_finish(recv: torch.Tensor, exchange: CopyEngineExchange | None = None,
                        token_major: bool = False) -> torch.Tensor:  # fmt: skip
    """(n, S, B, h/n, Ls, D), recv[r] = rank r's tokens of my heads -> (S, B, h/n, n*Ls, D); from the copy-engine
    transport already (S, B, h/n, n, Ls, D), tokens in rank order, which needs no copy; token_major: landed as
    (S, B, n, Ls, h/n, D) (`send_own_landed`), returned as a view too."""
    recv = _wait(recv, exchange)
    if token_major:
        s, b, n, ls, hl, d = recv.shape
        return recv.reshape(s, b, n * ls, hl, d).transpose(2, 3)
    if exchange is not None and exchange.land:
        s, b, hl, n, ls, d = recv.shape
        return recv.reshape(s, b, hl, n * ls, d)
    n, s, b, hl, ls, d = recv.shape
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(s, b, hl, n * ls, d)


def heads_to_seq_start(x: torch.Tensor, group, exchange: CopyEngineExchange | None = None) -> torch.Tensor:
    """(B, h/n, n*Ls, D) head shards -> all-to-all in flight; `heads_to_seq_finish` lays out what arrives."""
    n = dist.get_world_size(group)
    b, hl, length, d = x.shape
    if exchange is not None and exchange.land_output:  # token chunks of x laid out (B, n*Ls, h/n, D) as attention
        send = x.transpose(1, 2).reshape(b, n, length // n, hl, d).transpose(0, 1).contiguous()  # gives it: a view
        return exchange.start(send, dim=2)  # lands as (B, Ls, n, h/n, D): see `heads_to_seq_finish`
    return _all_to_all(x.reshape(b, hl, n, length // n, d).permute(2, 0, 1, 3, 4).contiguous(), group, exchange)


def heads_to_seq_finish(recv: torch.Tensor, exchange: CopyEngineExchange | None = None) -> torch.Tensor:
    """(n, B, h/n, Ls, D), recv[r] = my tokens of rank r's heads -> (B, h, Ls, D); from the copy-engine transport
    with `land_output` already (B, Ls, n, h/n, D): a view, whose `.transpose(1, 2).flatten(2)` is free."""
    recv = _wait(recv, exchange)
    if exchange is not None and exchange.land_output:
        b, ls, n, hl, d = recv.shape
        return recv.reshape(b, ls, n * hl, d).transpose(1, 2)
    n, b, hl, ls, d = recv.shape
    return recv.transpose(0, 1).reshape(b, n * hl, ls, d)


def heads_to_seq(x: torch.Tensor, group, exchange: CopyEngineExchange | None = None) -> torch.Tensor:
    """(B, h/n, n*Ls, D) head shards -> (B, h, Ls, D) sequence shards; the inverse of `seq_to_heads_*`."""
    return heads_to_seq_finish(heads_to_seq_start(x, group, exchange), exchange)


def ulysses_attention(q, k, v, layout: Layout, group, inner: str = "sdpa", key_index=None,
                      exchange: CopyEngineExchange | None = None) -> torch.Tensor:  # fmt: skip
    """(B, h, Ls, D) local q, k, v -> (B, h, Ls, D): all-to-all to head shards, full attention, all-to-all back.

    The local attention runs with the backend `inner`; padded keys are dropped before it (exact, no mask).
    `exchange`: the copy-engine transport (`copy_engine.CopyEngineExchange`); None: NCCL.
    """
    heads = seq_to_heads_start(torch.stack([q, k, v]), group, exchange)
    return heads_to_seq(ulysses_local(heads, layout, inner, key_index, exchange), group, exchange)


def ulysses_local(heads: torch.Tensor, layout: Layout, inner: str, key_index=None,
                  exchange: CopyEngineExchange | None = None, token_major: bool = False) -> torch.Tensor:  # fmt: skip
    """What arrived from `seq_to_heads_start` of stacked q, k, v (or from `send_qkv`, with its `token_major`) ->
    this rank's heads' attention output (B, h/n, n*Ls, D), ready for `heads_to_seq`."""
    q, k, v = seq_to_heads_finish(heads, exchange, token_major).unbind(0)  # each (B, h/n, n*Ls, D)
    if layout.padded:
        idx = layout.key_index(q.device) if key_index is None else key_index
        k, v = k.index_select(2, idx), v.index_select(2, idx)
    with attention_backend(inner):
        out = attention(q, k, v)  # (B, n*Ls, h/n * D)
    return out.unflatten(-1, (q.shape[1], -1)).transpose(1, 2)


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
    exchange: CopyEngineExchange | None = None  # Ulysses' transport: None = NCCL


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
    return ulysses_attention(q, k, v, c.layout, c.group, c.inner, c.key_index, c.exchange)


register_attention_backend("sequence-parallel", _sp_backend)


@contextlib.contextmanager
def _installed(call: _Call):
    _CALLS.append(call)
    try:
        with attention_backend("sequence-parallel"):
            yield
    finally:
        _CALLS.pop()


class OverlappedSingleBlock(SingleStreamBlock):
    """A SingleStreamBlock whose Ulysses all-to-alls run behind its MLP products (same weights, same function).

    The block's math in an order that leaves the GPU work while q, k, v travel to their head shards and the
    attention output travels back: linear1 is applied as its [q | k | v] rows and its [gate | up] rows, linear2 as
    its attention columns and its MLP columns (views of the same weights; outputs equal up to rounding order).
    `SequenceParallel(..., overlap=True)` swaps the class of the blocks it can (plain `nn.Linear` weights: not
    tensor-parallel or quantized ones); state_dict keys, parameters and the checkpoint layout are unchanged.
    Compiled, inductor's reordering (for peak memory, for locality) would move the MLP products after the waits
    (seen in its generated code on the CPU), so `compile_transformer` compiles these blocks without it: the
    program order stays, the up product behind the q, k, v transfer and the down product behind the output's.
    """

    compile_options: ClassVar[dict] = {"reorder_for_peak_memory": False, "reorder_for_locality": False}

    def forward(self, x, pe, mod, n_txt: int, kv=None):
        c = _CALLS[-1] if _CALLS else None  # outside SequenceParallel.forward the block is a plain block
        if c is None or kv is not None or c.mode != "ulysses":
            return super().forward(x, pe, mod, n_txt, kv)
        shift, scale, gate = mod
        h, w1, w2, hid = modulate(x, shift, scale), self.linear1.weight, self.linear2.weight, self.hidden
        q, k, v = split_heads(F.linear(h, w1[: 3 * hid]), self.heads)  # each (B, heads, Ls, D)
        ex = c.exchange
        heads, token_major = send_qkv(self.norm, q, k, v, pe, c.group, ex)
        mlp = self.mlp_act(F.linear(h, w1[3 * hid :]))  # (B, Ls, mlp_hidden) while q, k, v are in flight
        local = ulysses_local(heads, c.layout, c.inner, c.key_index, ex, token_major)
        back = heads_to_seq_start(local, c.group, ex)
        y = F.linear(mlp, w2[:, hid:])  # (B, Ls, H) while the attention output is in flight
        attn = heads_to_seq_finish(back, ex).transpose(1, 2).flatten(2)  # (B, Ls, H)
        return x + gate * (F.linear(attn, w2[:, :hid]) + y)


class OwnLandedDoubleBlock(DoubleStreamBlock):
    """A DoubleStreamBlock whose q, k, v reach Ulysses' exchange without being joined: where `own_landed` holds,
    each stream's q, k (normed, rotated) and v are written by the fused kernel straight into the send buffer and
    this rank's receive buffer at their token offsets (`send_own_landed`), instead of concatenated over the
    streams, stacked, packed and the own chunk copied (five copies of q, k, v). Elsewhere the block's own forward.
    Same weights, same function; `SequenceParallel(..., overlap=True)` swaps the class of the blocks with plain
    `nn.Linear` weights, as it does for `OverlappedSingleBlock`."""

    def forward(self, img, txt, pe, mod_img, mod_txt, kv=None):
        c = _CALLS[-1] if _CALLS else None
        if c is None or kv is not None or c.mode != "ulysses":
            return super().forward(img, txt, pe, mod_img, mod_txt, kv)
        ia, ta = self.img_attn, self.txt_attn
        if not own_landed(c.exchange, [ia.norm, ta.norm], img):
            return super().forward(img, txt, pe, mod_img, mod_txt, kv)
        (img_shift1, img_scale1, _), _ = mod_img
        (txt_shift1, txt_scale1, _), _ = mod_txt
        n_txt = txt.shape[1]
        img_q, img_k, img_v = split_heads(ia.qkv(modulate(img, img_shift1, img_scale1)), ia.heads)
        txt_q, txt_k, txt_v = split_heads(ta.qkv(modulate(txt, txt_shift1, txt_scale1)), ta.heads)
        parts = [(ta.norm, txt_q, txt_k, txt_v, pe[:, :, :n_txt]), (ia.norm, img_q, img_k, img_v, pe[:, :, n_txt:])]
        heads = send_own_landed(parts, dist.get_world_size(c.group), c.exchange)
        local = ulysses_local(heads, c.layout, c.inner, c.key_index, c.exchange, TOKEN_MAJOR[0])
        out = heads_to_seq(local, c.group, c.exchange)
        return self.after_attention(img, txt, out.transpose(1, 2).flatten(2), mod_img, mod_txt)


def own_landed_double_blocks(model: nn.Module) -> int:
    """Give every DoubleStreamBlock of `model` with plain nn.Linear q, k, v weights `OwnLandedDoubleBlock`'s
    forward; returns how many."""
    blocks = [m for m in model.modules() if type(m) is DoubleStreamBlock]
    plain = [b for b in blocks if type(b.img_attn.qkv) is nn.Linear and type(b.txt_attn.qkv) is nn.Linear]
    for b in plain:
        b.__class__ = OwnLandedDoubleBlock
    return len(plain)


def overlap_single_blocks(model: nn.Module) -> int:
    """Give every SingleStreamBlock of `model` with plain nn.Linear weights the overlapped forward; returns how many."""
    blocks = [m for m in model.modules() if type(m) is SingleStreamBlock]
    plain = [b for b in blocks if type(b.linear1) is nn.Linear and type(b.linear2) is nn.Linear]
    for b in plain:
        b.__class__ = OverlappedSingleBlock
    return len(plain)


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
    overlap: Ulysses only; the single blocks compute their MLP products while their all-to-alls are in flight
    (`OverlappedSingleBlock`), and over the copy-engine transport every block writes its own q, k, v heads where
    they land (`send_own_landed`, `OwnLandedDoubleBlock`); apply before compiling. transport: how Ulysses' all-to-alls move data, "nccl"
    (NCCL's kernels) or "copy-engine" (`copy_engine.CopyEngineExchange`: symmetric memory and copy engines, CUDA,
    compile with fullgraph=False). Every rank passes the same full inputs and gets the same full (B, L_img, 128)
    output.
    """

    def __init__(self, model: nn.Module, group=None, attention: str = "ulysses", inner: str = "sdpa",
                 overlap: bool = False, transport="nccl"):  # fmt: skip
        super().__init__()
        if attention not in MODES:
            raise ValueError(f"unknown sequence-parallel attention {attention!r}; known: {', '.join(MODES)}")
        if attention != "ulysses" and transport != "nccl":
            raise ValueError(f"transport {transport!r} carries Ulysses' all-to-alls; {attention} attention has none")
        self.model, self.mode, self.inner = model, attention, inner
        self.group = group if group is not None else dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if attention == "ulysses":
            check_divisible(local_heads(model), self.world, "Ulysses: attention heads per rank")
        self.overlapped = overlap_single_blocks(model) if overlap and attention == "ulysses" else 0
        if overlap and attention == "ulysses":
            own_landed_double_blocks(model)
        self.exchange = make_exchange(transport, self.group)
        share_step_cache(self, model, self.group)  # a step cache decides from every rank's tokens

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
        if self.exchange is not None:
            self.exchange.begin(x.device)
        with _installed(_Call(layout, self.group, self.mode, self.inner, keys, self.exchange)):
            out = self.model(x, x_ids, timesteps, ctx, ctx_ids, guidance=guidance)  # (B, pi, 128)
        return gather_tokens(out, layout.n_img, self.group)

    def forward_kv_extract(self, *args, **kwargs):
        raise NotImplementedError("the klein KV-cache forward is not supported under sequence parallelism")
