"""Ulysses' all-to-alls over NCCL and over copy engines, alone and beside the matmul that hides them.

    PYTHONPATH=src python3 -m torch.distributed.run --standalone --nproc-per-node 4 bench/all_to_all.py \
        --sizes 1024 2048 --out $OUT/all_to_all.json

For dev (48 heads x 128) at each size (image tokens + 512 text tokens, split over the ranks) and each transport
("nccl": NCCL's all-to-all kernels; "copy-engine-pull" and "copy-engine-push": `fluxrt.parallel.copy_engine`
in its two modes, q, k, v landing in head order since the eleventh session's last runs; the tenth session's rows
named the pull mode "copy-engine"), the two exchanges of a single block: q, k, v to head shards
(`seq_to_heads_*`, with the MLP up product, tokens/n x 6144 @ 6144 x 36864, as the work beside it) and the
attention output back (`heads_to_seq_*`, with the down product, 18432 -> 6144). Timed on rank 0 with CUDA events, --iters back-to-back repetitions after a warm-up, in ms per repetition:
  a2a       the exchange alone (start, wait); a2a_host_ms: the host's time to issue one (when it is as long as
            a2a, the exchange is bound by Python and launches, not by the links)
  mm        the matmul alone
  together  start, the matmul, wait: as `--overlap` runs them
  hidden    a2a + mm - together (the part of the exchange the overlap hid); mm_slowdown = together - mm
All transports' received tensors are compared (they must be equal bit for bit). bf16, random inputs. With
--cuda-graph each of the three is captured once and its replays are timed (host time is then the replay call's).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fluxrt.parallel import init_from_env, nccl_env
from fluxrt.parallel.copy_engine import CopyEngineExchange
from fluxrt.parallel.sp import heads_to_seq_finish, heads_to_seq_start, seq_to_heads_finish, seq_to_heads_start

HEADS, HEAD_DIM, HIDDEN, MLP = 48, 128, 6144, 18432


def _ms(fn, iters: int) -> tuple[float, float]:
    """(GPU ms, host ms) per call of `fn` over `iters` back-to-back calls; host = the time to issue them."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / iters
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters, host


def as_graph(fn):
    """`fn` captured once as a CUDA graph (after warm-up calls on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def exchange(x, start, finish, ex, work=None, replayed: bool = False) -> torch.Tensor:
    """One all-to-all of `x` over the world (`ex`: None = NCCL), with `work()` issued while it is in flight.
    `replayed` (a CUDA graph's capture): the copy-engine exchange starts with `begin`, its barrier, since the
    replays of one captured exchange reuse one buffer (called eagerly, exchanges take the two in turn)."""
    if ex is not None and replayed:
        ex.begin(x.device)
    pending = start(x, dist.group.WORLD, ex)
    if work is not None:
        work()
    return finish(pending, ex)


def cases(size: int, n: int, device):
    """(name, send tensor, start, finish, matmul) for the two exchanges of a single block at `size`."""
    ls = (size // 16) ** 2 // n + 512 // n
    g = torch.Generator(device=device).manual_seed(dist.get_rank())
    qkv = torch.randn(3, 1, HEADS, ls, HEAD_DIM, generator=g, device=device).bfloat16()
    out = torch.randn(1, HEADS // n, n * ls, HEAD_DIM, generator=g, device=device).bfloat16()
    h, w1 = torch.randn(ls, HIDDEN, device=device).bfloat16(), torch.randn(2 * MLP, HIDDEN, device=device).bfloat16()
    m, w2 = torch.randn(ls, MLP, device=device).bfloat16(), torch.randn(HIDDEN, MLP, device=device).bfloat16()
    return [
        ("qkv_to_heads", qkv, seq_to_heads_start, seq_to_heads_finish, lambda: F.linear(h, w1)),
        ("out_to_seq", out, heads_to_seq_start, heads_to_seq_finish, lambda: F.linear(m, w2)),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cuda-graph", action="store_true", help="time replays of each case captured as a CUDA graph "
                    "(no host cost: what the exchange leaves exposed inside `--cuda-graph` runs)")  # fmt: skip
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "all_to_all.json"))
    args = ap.parse_args(argv)
    info = init_from_env()
    n = info.world_size
    ce_pull, ce_push = (CopyEngineExchange(dist.group.WORLD, push=push) for push in (False, True))
    rows = []
    for size in args.sizes:
        for name, x, start, finish, mm in cases(size, n, info.device):
            got = {}
            wrap = as_graph if args.cuda_graph else (lambda fn: fn)
            mm_ms = _ms(wrap(mm), args.iters)[0]
            for transport, ex in (("nccl", None), ("copy-engine-pull", ce_pull), ("copy-engine-push", ce_push)):
                got[transport] = exchange(x, start, finish, ex).clone()  # push: a view of a reused buffer
                one = functools.partial(exchange, x, start, finish, ex, replayed=args.cuda_graph)
                a2a, host = _ms(wrap(one), args.iters)
                together = _ms(wrap(functools.partial(one, work=mm)), args.iters)[0]
                row = {"size": size, "message": name, "transport": transport, "ranks": n,
                       "cuda_graph": args.cuda_graph, "bytes_per_rank": x.numel() * x.element_size(), "a2a_ms": a2a,
                       "a2a_host_ms": host, "mm_ms": mm_ms, "together_ms": together,
                       "hidden_ms": a2a + mm_ms - together, "mm_slowdown_ms": together - mm_ms}  # fmt: skip
                row["a2a_GBps_per_rank"] = row["bytes_per_rank"] * (n - 1) / n / a2a / 1e6
                if info.rank == 0:
                    print(json.dumps(row), flush=True)
                rows.append(row)
            same = all(torch.equal(got["nccl"], t) for t in got.values())
            flags = torch.tensor([int(same)], device=info.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            for r in rows[-3:]:
                r["equal_to_nccl_all_ranks"] = bool(flags.item())
    if info.rank == 0:
        meta = {"card": torch.cuda.get_device_name(info.device), "torch": torch.__version__,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "nccl_env": nccl_env(),
                "symm_mem_env": {k: v for k, v in os.environ.items() if k.startswith("TORCH_SYMM_MEM")},
                "date": datetime.date.today().isoformat()}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump([r | meta for r in rows], f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
