"""Starting processes and building process groups for parallel runs.

Two ways to start n ranks:
  * torchrun (one host or many): `torchrun --nproc-per-node N -m fluxrt generate ...`; the program calls
    `init_from_env()`, which reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by torchrun.
  * `spawn(n, fn, *args)` from one Python process (what `fluxrt generate --gpus N` uses): starts n local processes
    on 127.0.0.1 with a free port, runs fn(*args) on each after `init_from_env()`, returns rank 0's result.

The backend is NCCL when CUDA is available, else gloo. NCCL_* variables are never set here: the environment
(e.g. NCCL_NVLS_ENABLE=0) reaches NCCL unchanged, in torchrun's ranks and in spawned children alike.
`make_mesh(sp, tp)` splits the world into a 2-D (sequence x tensor) mesh of process subgroups.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's variables; a plain single process gets world size 1.

    CUDA: device cuda:LOCAL_RANK, backend "nccl"; otherwise CPU and "gloo". Safe to call twice.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"),
            timeout=timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local, device)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_env() -> dict[str, str]:
    """The NCCL_* variables of this process's environment (recorded by benchmarks; never set here)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}


def _child(rank: int, n: int, port: int, result: str, timeout_s: float, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    if not torch.cuda.is_available():  # n CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    init_from_env(timeout_s=timeout_s)
    try:
        out = fn(*args)
        if rank == 0:
            torch.save(out, result)
    finally:
        dist.destroy_process_group()


def spawn(n: int, fn, *args, start_method: str = "spawn", timeout_s: float = 600.0):
    """Run fn(*args) in n new local processes joined in one process group; return rank 0's return value.

    fn must be importable (module level). `start_method="fork"` starts in milliseconds but is for CPU only
    (CUDA cannot be used after fork); "spawn" re-imports everything in each child. A child's exception is
    re-raised here (torch.multiprocessing.ProcessRaisedException) after the other ranks are stopped.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rank0.pt")
        args = (n, free_port(), result, timeout_s, fn, args)
        mp.start_processes(_child, args=args, nprocs=n, join=True, start_method=start_method)
        return torch.load(result, weights_only=False) if os.path.exists(result) else None


@dataclass(frozen=True)
class Mesh:
    """This rank's place in a (sp x tp) mesh: rank = sp_rank * tp + tp_rank, so TP groups are adjacent ranks."""

    sp: int
    tp: int
    sp_group: object
    tp_group: object
    sp_rank: int
    tp_rank: int


def make_mesh(sp: int, tp: int) -> Mesh:
    """Split the initialised world (size sp*tp) into sequence-parallel and tensor-parallel subgroups.

    Every rank must call this with the same (sp, tp): `new_group` is collective.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp * tp != world:
        raise ValueError(f"mesh {sp} (sequence) x {tp} (tensor) = {sp * tp} ranks, but the world has {world}")
    tp_group = sp_group = None
    for i in range(sp):  # ranks of one TP group: same sequence shard, different heads
        g = dist.new_group([i * tp + j for j in range(tp)])
        tp_group = g if rank // tp == i else tp_group
    for j in range(tp):  # ranks of one SP group: same heads, different sequence shards
        g = dist.new_group([i * tp + j for i in range(sp)])
        sp_group = g if rank % tp == j else sp_group
    return Mesh(sp, tp, sp_group, tp_group, rank // tp, rank % tp)
