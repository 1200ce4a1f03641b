"""torch.distributed plans for the flow transformer, applied to a built model from outside.

    info = init_from_env()                      # torchrun's variables, or spawn(n, fn, ...)
    mesh = make_mesh(sp=2, tp=2)                # 4 ranks: 2-way sequence x 2-way tensor parallel
    model = parallelize(model, mesh, "ulysses") # apply_tensor_parallel over mesh.tp_group, then SequenceParallel

* `SequenceParallel(model, group, attention="ulysses" | "ring")` (sp.py): tokens split over ranks, attention
  communicates (Ulysses all-to-all, or ring K/V passing with online softmax). Exact: same function as one process.
* copy_engine.py: `SequenceParallel(..., transport="copy-engine")` moves Ulysses' all-to-alls with peer copies on
  the GPUs' copy engines through symmetric memory instead of NCCL's kernels (CUDA only).
* `apply_tensor_parallel(model, group)` (tp.py): weights split by heads and MLP columns, all-reduce after the
  row-sharded projections. Exact up to summation order.
* `BatchParallel(model, group)` (batch.py): each forward's batch rows (CFG halves, images) split over the ranks,
  outputs all-gathered; whole model on every rank.
* launch.py: `init_from_env`, `spawn`, `make_mesh`, `nccl_env`, `with_rank`. docs/PARALLEL.md has the commands.
* plan.py: `choose_plan(cfg, world, "auto" | "sp" | "ring" | "tp" | "sptp" | "spAtpB" ...)`, checked before loading.
* generate.py: `fluxrt generate --gpus N` / under torchrun: every rank samples, rank 0 encodes text and writes.
The model file knows none of this. Inference only.
"""

from __future__ import annotations

from torch import nn

from .batch import BatchParallel
from .launch import DistInfo, Mesh, free_port, init_from_env, make_mesh, nccl_env, spawn
from .sp import SequenceParallel, block_attention, ring_attention, ulysses_attention
from .tp import RowParallelLinear, apply_tensor_parallel


def parallelize(model: nn.Module, mesh: Mesh, attention: str = "ulysses", inner: str = "sdpa",
                overlap: bool = False, transport="nccl") -> nn.Module:  # fmt: skip
    """Tensor parallel over mesh.tp_group (if tp > 1 and the model was not loaded sharded over it), then sequence
    parallel over mesh.sp_group (if sp > 1; `overlap`, `transport`: see `SequenceParallel`)."""
    if mesh.tp > 1 and getattr(model, "tensor_parallel", 1) != mesh.tp:
        model = apply_tensor_parallel(model, mesh.tp_group)
    if mesh.sp > 1:
        model = SequenceParallel(model, mesh.sp_group, attention, inner, overlap, transport)
    return model


__all__ = [
    "BatchParallel", "DistInfo", "Mesh", "RowParallelLinear", "SequenceParallel", "apply_tensor_parallel", "block_attention",
    "free_port", "init_from_env", "make_mesh", "nccl_env", "parallelize", "ring_attention", "spawn",
    "ulysses_attention",
]  # fmt: skip
