"""Starting processes and building process groups for parallel runs.

Two ways to start n ranks:
  * torchrun (one host or many): `torchrun --nproc-per-node N -m fluxrt generate ...`; the program calls
    `init_from_env()`, which reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by torchrun.
  * `spawn(n, fn, *args)` from one Python process (what `fluxrt generate --gpus N` uses): starts n local processes
    on 127.0.0.1 with a free port, runs fn(*args) on each after `init_from_env()`, returns rank 0's result.
    An exception on any rank stops the others and is raised again in the caller, same type, its message
    starting with "rank r of n: " (the rank that failed first; the child's traceback is attached as a note).

The backend is NCCL on CUDA (device cuda:LOCAL_RANK), else gloo on the CPU; `device_type="cpu"` asks for CPU ranks
on a machine with GPUs. NCCL_* variables are never set here: the environment (e.g. NCCL_NVLS_ENABLE=0) reaches
NCCL unchanged, in torchrun's ranks and in spawned children alike.
`make_mesh(sp, tp)` splits the world into a 2-D (sequence x tensor) mesh of process subgroups.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def rank_device_type(device_type: str | None = None) -> str:
    """The device type of the ranks: `device_type` if given (checked), else "cuda" when available, else "cpu"."""
    if device_type not in (None, "cuda", "cpu"):
        raise ValueError(f"parallel ranks run on 'cuda' or 'cpu', not {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("parallel ranks on 'cuda' were asked for, but torch sees no CUDA GPU")
    return device_type or ("cuda" if torch.cuda.is_available() else "cpu")


def init_from_env(backend: str | None = None, timeout_s: float = 600.0, device_type: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's variables; a plain single process gets world size 1.

    CUDA: device cuda:LOCAL_RANK, backend "nccl"; CPU (no CUDA, or device_type="cpu"): backend "gloo".
    Safe to call twice.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = rank_device_type(device_type) == "cuda"
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


def with_rank(exc: BaseException, rank: int, world: int) -> BaseException:
    """The same kind of exception, its message prefixed with "rank r of n: " (a plain copy when the type needs
    other constructor arguments: then a RuntimeError naming the type)."""
    msg = f"rank {rank} of {world}: {exc}"
    try:
        new = type(exc)(msg)
    except Exception:  # noqa: BLE001 - exception types with other signatures
        new = RuntimeError(f"rank {rank} of {world}: {type(exc).__name__}: {exc}")
    new.__cause__ = exc.__cause__
    return new


def _save_error(folder: str, rank: int, exc: BaseException) -> None:
    """What failed on this rank, for the parent: the exception (pickled if it can be), its traceback, the time."""
    try:
        blob = pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - unpicklable exceptions travel as their text
        blob = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    record = {"exc": blob, "traceback": traceback.format_exc(), "time": time.time()}
    Path(folder, f"error{rank}.pkl").write_bytes(pickle.dumps(record))


def _first_error(folder: str, world: int, failure: ProcessException) -> BaseException:
    """The exception of the rank that failed first (others often fail after it, e.g. on a closed connection)."""
    records = []
    for r in range(world):
        path = Path(folder, f"error{r}.pkl")
        if path.exists():
            records.append((pickle.loads(path.read_bytes()), r))
    if not records:  # killed by a signal or os._exit: the message of torch's exception is all there is
        return failure
    record, rank = min(records, key=lambda rr: rr[0]["time"])
    new = with_rank(pickle.loads(record["exc"]), rank, world)
    new.add_note(f"traceback on rank {rank}:\n{record['traceback'].rstrip()}")
    return new


def _child(rank: int, n: int, port: int, folder: str, timeout_s: float, device_type, fn, args) -> None:
    _forget_parent_threads()
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    if rank_device_type(device_type) == "cpu":  # n CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    try:
        init_from_env(timeout_s=timeout_s, device_type=device_type)
        out = fn(*args)
    except BaseException as e:
        _save_error(folder, rank, e)
        raise  # no destroy_process_group here: other ranks may be blocked in a collective; the parent stops them
    if rank == 0:
        torch.save(out, os.path.join(folder, "rank0.pt"))
    dist.destroy_process_group()


def spawn(
    n: int,
    fn,
    *args,
    start_method: str = "spawn",
    timeout_s: float = 600.0,
    device_type: str | None = None,
    deadline_s: float | None = None,
):
    """Run fn(*args) in n new local processes joined in one process group; return rank 0's return value.

    fn must be importable (module level). `start_method="fork"` starts in milliseconds but is for CPU only
    (CUDA cannot be used after fork); "spawn" re-imports everything in each child. device_type: None (cuda if
    available), "cuda" or "cpu". When a rank raises, the others are stopped and its exception is raised here:
    same type, message "rank r of n: ...", the child's traceback as a note (`with_rank`).
    timeout_s bounds each collective (the process group's timeout); deadline_s, if given, bounds the whole run:
    past it the ranks are killed and TimeoutError is raised (a rank stuck outside a collective never times out).
    """
    if deadline_s is not None and deadline_s <= 0:
        raise ValueError(f"deadline_s must be positive seconds, got {deadline_s!r}")
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rank0.pt")
        args = (n, free_port(), tmp, timeout_s, device_type, fn, args)
        ctx = mp.start_processes(_child, args=args, nprocs=n, join=False, start_method=start_method)
        end = None if deadline_s is None else time.monotonic() + deadline_s
        try:
            while not ctx.join(None if end is None else max(0.0, end - time.monotonic())):
                if end is not None and time.monotonic() >= end:
                    _kill(ctx)
                    raise TimeoutError(f"{n} ranks of {getattr(fn, '__name__', fn)} still running after "
                                       f"deadline_s={deadline_s} s; stopped")  # fmt: skip
        except ProcessException as failure:
            raise _first_error(tmp, n, failure) from None
        return torch.load(result, weights_only=False) if os.path.exists(result) else None


def _kill(ctx) -> None:
    """Stop every rank of a process context still alive and reap it."""
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for p in ctx.processes:
        p.join(5)


def _forget_parent_threads() -> None:
    """In a forked child: drop inductor's compile thread pool inherited from the parent. Its threads did not survive
    the fork, but the executor still counts them, so the first compile in the child would wait forever (torch resets
    its process pools after a fork, not this one)."""
    module = sys.modules.get("torch._inductor.async_compile")
    if module is not None:
        module.AsyncCompile.pool.cache_clear()


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
