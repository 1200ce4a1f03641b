"""Tensor parallelism for the flow transformer: every block's weights split over the ranks of a group.

`apply_tensor_parallel(model, group)` edits a built `Flux2` in place (weights sliced from the full ones) and
returns it. Rank r of n keeps heads [r*h/n, (r+1)*h/n) and MLP columns [r*M/n, (r+1)*M/n):

  double blocks   `*_attn.qkv`  column-sharded by heads: rows [q_r | k_r | v_r] of the fused [q | k | v]
                  `*_attn.proj` row-sharded (its input columns of heads r), then all-reduce
                  `*_mlp.0`     column-sharded keeping pairs aligned: rows [gate_r | up_r] of [gate | up]
                  `*_mlp.2`     row-sharded (input columns r), then all-reduce
  single blocks   `linear1`     rows [q_r | k_r | v_r | gate_r | up_r] of [q | k | v | gate | up]
                  `linear2`     input columns [attn_r | mlp_r] of [attn (H) | mlp (M)], then all-reduce
  replicated      QK-norm scales (per head_dim), modulations, embedders, final layer

Module names and the checkpoint keys stay the same, so the loader fills the shards directly:
`load_transformer(..., split=sharded_loading(group))` shards the meta-built model and slices each checkpoint tensor
on the CPU (`shard_full`, from the same table `split_of` that `apply_tensor_parallel` follows) before it reaches the
rank's device; `quantize_row_shards` then gives such a model's row shards fp8 with whole-row scales. Each block
does two all-reduces (double: one per stream for attention and for the MLP, i.e. four; single: one). The sum of
partial products equals the full matmul in exact arithmetic; in floating point it differs by summation order
(fp32: ~1e-7 relative; bf16: each partial is rounded to bf16 before the all-reduce).

fp8 layers (`fluxrt.quant.fp8.Fp8Linear`, quantized before sharding, as `fluxrt generate --quant fp8` does) shard
too: a column shard keeps its output rows' weights and scales, so it computes exactly what one process does; a row
shard keeps its input columns with the full rows' scales, and quantizes its activations per token over this rank's
features only, a finer grouping than one process's (same e4m3 format, an error no larger, results that differ from
one process's by a fraction of the fp8 error). Other quantized layers (nf4, int4: scales per block of input
features) are refused.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..models.transformer import DoubleStreamBlock
from ..quant.fp8 import E4M3, Fp8Linear, skipped
from .sp import check_divisible


class RowParallelLinear(nn.Linear):
    """Linear over an input-feature shard (weight (out, in/n)); the partial outputs are all-reduced (summed)."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (..., out) partial sum over this rank's input features
        dist.all_reduce(y, group=self.group)
        return y


class Fp8RowParallelLinear(Fp8Linear):
    """Fp8Linear over an input-feature shard (weight (out, in/n) e4m3, scales of the full rows); outputs all-reduced."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # activations quantized per token over this rank's features
        dist.all_reduce(y, group=self.group)
        return y


def shard_rows(w: torch.Tensor, blocks: list[int], rank: int, world: int) -> torch.Tensor:
    """Split w's rows into consecutive blocks of the given sizes; keep shard `rank` of each block, concatenated."""
    return torch.cat([b.chunk(world, dim=0)[rank] for b in w.split(blocks, dim=0)], dim=0)


def shard_cols(w: torch.Tensor, blocks: list[int], rank: int, world: int) -> torch.Tensor:
    """The same on the input columns (dim 1)."""
    return shard_rows(w.t(), blocks, rank, world).t().contiguous()


def _fp8_shard(w: torch.Tensor, shard, blocks: list[int], rank: int, world: int) -> torch.Tensor:
    """`shard_rows` or `shard_cols` of an e4m3 weight, moved as bytes: no float8 copy kernel needed on its device."""
    return shard(w.view(torch.uint8), blocks, rank, world).view(E4M3)


def _column_(lin: nn.Linear | Fp8Linear, blocks: list[int], rank: int, world: int) -> None:
    """Replace lin's weight (and an fp8 layer's row scales) by its output-row shard (no communication needed)."""
    if isinstance(lin, Fp8Linear):
        lin.weight = _fp8_shard(lin.weight, shard_rows, blocks, rank, world)
        lin.weight_scale = shard_rows(lin.weight_scale, blocks, rank, world)
    else:
        lin.weight = nn.Parameter(shard_rows(lin.weight.data, blocks, rank, world), requires_grad=False)
    lin.out_features = lin.weight.shape[0]


def _row(lin: nn.Linear | Fp8Linear, blocks: list[int], rank: int, world: int, group) -> nn.Module:
    if not isinstance(lin, Fp8Linear):
        return RowParallelLinear(shard_cols(lin.weight.data, blocks, rank, world), group)
    w = _fp8_shard(lin.weight, shard_cols, blocks, rank, world)
    # built on w's device, so that "auto" resolves there; its empty buffers are replaced at once
    out = Fp8RowParallelLinear(w.shape[1], w.shape[0], impl="auto" if lin.auto else lin.impl,
                               fast_accum=lin.fast_accum, device=w.device)  # fmt: skip
    out.weight, out.weight_scale, out.group = w, lin.weight_scale, group  # one scale per (whole) output row
    return out


# BFL weight name -> how TP splits it: "rows" (output features, column-parallel) or "cols" (input features,
# row-parallel), over consecutive blocks of these sizes (h: hidden size, m: MLP width)
_SPLITS = (
    (re.compile(r"double_blocks\.\d+\.(img|txt)_attn\.qkv\.weight"), "rows", lambda h, m: [h, h, h]),
    (re.compile(r"double_blocks\.\d+\.(img|txt)_attn\.proj\.weight"), "cols", lambda h, m: [h]),
    (re.compile(r"double_blocks\.\d+\.(img|txt)_mlp\.0\.weight"), "rows", lambda h, m: [m, m]),
    (re.compile(r"double_blocks\.\d+\.(img|txt)_mlp\.2\.weight"), "cols", lambda h, m: [m]),
    (re.compile(r"single_blocks\.\d+\.linear1\.weight"), "rows", lambda h, m: [h, h, h, m, m]),
    (re.compile(r"single_blocks\.\d+\.linear2\.weight"), "cols", lambda h, m: [h, m]),
)


def split_of(name: str, cfg) -> tuple[str, list[int]] | None:
    """("rows" | "cols", block sizes) for a weight that tensor parallelism splits, None for a replicated one."""
    for pattern, axis, blocks in _SPLITS:
        if pattern.fullmatch(name):
            return axis, blocks(cfg.hidden_size, cfg.mlp_hidden)
    return None


def shard_full(name: str, t: torch.Tensor, cfg, rank: int, world: int) -> torch.Tensor:
    """The part of the full checkpoint tensor `name` that rank `rank` of `world` holds (all of it if replicated)."""
    split = split_of(name, cfg)
    if split is None:
        return t
    return (shard_rows if split[0] == "rows" else shard_cols)(t, split[1], rank, world)


def _shard_block(block: nn.Module, prefix: str, cfg, rank: int, world: int, group) -> None:
    """Column-shard the block's "rows" linears in place; replace its "cols" linears by row-parallel ones."""
    for name, lin in list(block.named_modules()):
        split = split_of(f"{prefix}.{name}.weight", cfg)
        if split is None:
            continue
        if split[0] == "rows":
            _column_(lin, split[1], rank, world)
        else:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, _row(lin, split[1], rank, world, group))
    if isinstance(block, DoubleStreamBlock):
        block.img_attn.heads //= world
        block.txt_attn.heads //= world
    else:
        block.heads //= world
        block.hidden //= world  # the block splits linear1's output at 3*hidden, 2*mlp_hidden: local sizes now
        block.mlp_hidden //= world


def apply_tensor_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shard a built `Flux2` over `group` in place (see the module docstring); returns the model.

    Raises ValueError when the group size does not divide num_heads or the MLP width.
    """
    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    cfg = model.cfg
    if getattr(model, "tensor_parallel", 1) != 1:
        raise ValueError(f"model is already tensor-parallel over {model.tensor_parallel} ranks")
    check_divisible(cfg.num_heads, world, "tensor parallelism: num_heads")
    check_divisible(cfg.mlp_hidden, world, "tensor parallelism: MLP width")
    odd = sorted({type(m).__name__ for b in (*model.double_blocks, *model.single_blocks) for m in b.modules()
                  if "Linear" in type(m).__name__ and type(m) not in (nn.Linear, Fp8Linear)})  # fmt: skip
    if odd:  # 4-bit layers keep scales per block of input features that a column split would cut through
        raise ValueError(f"tensor parallelism splits plain and fp8 linears; the blocks hold {', '.join(odd)} "
                         f"(4-bit?): use sequence parallelism (--parallel sp or ring) for this model")  # fmt: skip
    for i, block in enumerate(model.double_blocks):
        _shard_block(block, f"double_blocks.{i}", cfg, rank, world, group)
    for i, block in enumerate(model.single_blocks):
        _shard_block(block, f"single_blocks.{i}", cfg, rank, world, group)
    model.tensor_parallel = world
    return model


@torch.no_grad()
def quantize_row_shards(model: nn.Module, skip: tuple[str, ...], group=None) -> nn.Module:
    """fp8 for the row-parallel layers of a model loaded sharded (`sharded_loading`; its column shards are plain
    Linears that `quantize_transformer` quantizes like any other, their rows being whole): each row's scale is the
    max over the ranks of its shards' amax, so every layer equals the whole model's fp8 layer split afterwards.
    Layers under a `skip` entry stay as they are. In place; returns the model."""
    group = group if group is not None else dist.group.WORLD
    targets = [n for n, m in model.named_modules() if type(m) is RowParallelLinear and not skipped(n, skip)
               and m.in_features % 16 == 0 and m.out_features % 16 == 0]  # fmt: skip
    for name in targets:
        parent, _, attr = name.rpartition(".")
        lin = model.get_submodule(name)
        amax = lin.weight.abs().amax(dim=1).float()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        out = Fp8RowParallelLinear.from_linear(lin, amax=amax)
        out.group = group
        setattr(model.get_submodule(parent), attr, out)
    return model


def sharded_loading(group=None):
    """A `split` for `load_transformer`: it shards the model (on the meta device, before any tensor is read) and
    tells the loader which part of each full checkpoint tensor this rank keeps, so a rank reads its shard and
    never holds the whole transformer on its device."""
    group = group if group is not None else dist.group.WORLD

    def split(model: nn.Module):
        apply_tensor_parallel(model, group)
        world, rank, cfg = dist.get_world_size(group), dist.get_rank(group), model.cfg
        return lambda name, t: shard_full(name, t, cfg, rank, world)

    return split
