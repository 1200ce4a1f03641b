"""`fluxrt generate` over several processes: `--gpus N` (this process spawns the ranks) or torchrun's ranks.

Contract:
    add_arguments(parser)                      --gpus N and --parallel PLAN on the generate command
    Launch.from_args(args, spec, record=None) -> Launch
                                               one process, this torchrun rank (joins the group), or N ranks to
                                               spawn; the plan is checked against the model before any loading
    launch.run(ref, args, valid, record) -> [GenerationResult] in the main process, None on torchrun ranks > 0
    BroadcastTextEncoder(encoder | None, device)   rank 0 encodes, every rank receives the (B, T, C) features

Every rank loads the transformer (split by the plan, `fluxrt.parallel.parallelize`; under TP it reads only its
shards, `tp.sharded_loading`) and the VAE, and runs the same validated request with the same seeds: after each
step every rank holds the same full latent, so the sampler is unchanged. Only rank 0 loads the text encoder (dev's
is 24B parameters: one copy, not N) and broadcasts its features. Every rank encodes its references and decodes with its own VAE (84M parameters), so
all ranks run exactly `Pipeline.run`; only rank 0's images are kept. Only the main process (rank 0 under torchrun,
the parent under --gpus) builds the safety guard, prints and writes files. An error on any rank ends the run with
that error, its message starting "rank r of n:". NCCL_* variables are never set: the environment's (e.g.
NCCL_NVLS_ENABLE=0) reach NCCL unchanged.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import parallelize
from .batch import BatchParallel
from .copy_engine import TRANSPORTS
from .launch import init_from_env, make_mesh, rank_device_type, spawn, with_rank
from .plan import PLAN_NAMES, Plan, choose_plan

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # wire codes of the feature header
_MAX_DIMS = 6


def add_arguments(p) -> None:
    """The generate command's parallel options."""
    p.add_argument("--gpus", type=int, metavar="N",
                   help="split the transformer over N GPUs: starts N processes, one per GPU, NCCL (on a machine "
                   "without CUDA, or with --device cpu: N CPU processes over gloo, for testing); under torchrun "
                   "leave it out: torchrun's ranks are used")  # fmt: skip
    p.add_argument("--parallel", default="auto", metavar="PLAN",
                   help=f"how the ranks split the transformer: {', '.join(PLAN_NAMES)}, or explicit spN, ringN, "
                   "tpN, spAtpB, ringAtpB, batchN (default auto: Ulysses sequence parallel when the GPUs divide the "
                   "heads, else ring attention; batch: each forward's rows over the ranks, i.e. a CFG model's two "
                   "halves or --num-images; see docs/PARALLEL.md)")  # fmt: skip
    p.add_argument("--overlap", action="store_true",
                   help="Ulysses plans: the single blocks run their MLP products while their all-to-alls are in "
                   "flight (same weights and result up to rounding order; docs/PARALLEL.md)")  # fmt: skip
    p.add_argument("--transport", choices=TRANSPORTS, default="nccl",
                   help="how Ulysses' all-to-alls move data: nccl (NCCL's kernels, default) or copy-engine (peer "
                   "copies on the GPUs' copy engines through symmetric memory, no SMs taken from the matmuls; CUDA "
                   "only; with --overlap faster than nccl at 1024² on 4 H200s, docs/PARALLEL.md)")  # fmt: skip


class BroadcastTextEncoder(nn.Module):
    """Rank 0's text encoder serving every rank: `encode(prompts)` runs on rank 0 and its (B, T, C) features reach
    every rank by two broadcasts (a header with dtype and shape, then the tensor). Ranks > 0 pass None.

    Every rank must call `encode` with the same prompts in the same order (the pipeline's prompt cache then hits
    and misses alike on every rank). `device` is where the collective runs: the rank's GPU (NCCL) or the CPU (gloo).
    """

    def __init__(self, encoder: nn.Module | None, device: torch.device, group=None):
        super().__init__()
        self.encoder, self.device, self.group = encoder, torch.device(device), group

    @property
    def config(self):
        return getattr(self.encoder, "config", None)

    @property
    def system_message(self):
        return getattr(self.encoder, "system_message", None)

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=self.device)
        feats = None
        if self.encoder is not None:
            feats = self.encoder.encode(prompts).to(self.device).contiguous()
            header[0], header[1] = _DTYPES.index(feats.dtype), feats.ndim
            header[2 : 2 + feats.ndim] = torch.tensor(feats.shape)
        dist.broadcast(header, src=0, group=self.group)
        if feats is None:
            code, ndim = header[:2].tolist()
            feats = torch.empty(header[2 : 2 + ndim].tolist(), dtype=_DTYPES[code], device=self.device)
        dist.broadcast(feats, src=0, group=self.group)
        return feats


@dataclass(frozen=True)
class Launch:
    """How this `fluxrt generate` process takes part: alone, as a torchrun rank, or as the parent of --gpus ranks."""

    plan: Plan
    rank: int = 0  # this process's rank (0 for a single process and for the --gpus parent)
    spawn: bool = False  # --gpus N: start the ranks here
    device_type: str = "cpu"

    @property
    def parallel(self) -> bool:
        return self.plan.world > 1

    @property
    def is_main(self) -> bool:
        """The process that prints, builds the safety guard and writes files."""
        return self.rank == 0

    @classmethod
    def from_args(cls, args, spec, record: dict | None = None) -> Launch:
        """Checks every option against the plan (and `--cuda-graph` against the devices and the step cache,
        `--from`'s `record` included) before anything loads or joins a group."""
        torchrun_world = int(os.environ.get("WORLD_SIZE", "1"))
        gpus = getattr(args, "gpus", None)
        if gpus is not None and gpus < 1:
            raise ValueError(f"--gpus must be at least 1, got {gpus}")
        world = torchrun_world if torchrun_world > 1 else (gpus or 1)
        if torchrun_world > 1 and gpus not in (None, torchrun_world):
            raise ValueError(f"--gpus {gpus} contradicts torchrun's {torchrun_world} ranks: leave --gpus out "
                             f"under torchrun")  # fmt: skip
        plan = choose_plan(spec.transformer, world, getattr(args, "parallel", "auto"))
        if plan.batch > 1:
            check_batch(plan, spec, getattr(args, "num_images", 1))
        if getattr(args, "overlap", False) and (plan.sp == 1 or plan.attention != "ulysses"):
            raise ValueError(f"--overlap hides Ulysses all-to-alls; plan {plan.name} has none (use spN or spAtpB)")
        transport = getattr(args, "transport", "nccl")
        if transport != "nccl" and (plan.sp == 1 or plan.attention != "ulysses"):
            raise ValueError(f"--transport {transport} carries Ulysses all-to-alls; plan {plan.name} has none "
                             f"(use spN or spAtpB)")  # fmt: skip
        device_type = _device_type(args, world, spawning=torchrun_world == 1) if world > 1 else None
        if getattr(args, "cuda_graph", False):
            from ..cli import step_cache_from_args
            from ..pipeline import check_cuda_graph, parse_device

            check_cuda_graph(device_type or parse_device(args.device).type, step_cache_from_args(args, record or {}))
        if world == 1:
            return cls(plan)
        if transport == "copy-engine" and device_type != "cuda":
            raise ValueError(f"--transport copy-engine needs CUDA GPUs (symmetric memory); this run's ranks are on "
                             f"{device_type} (use --transport nccl)")  # fmt: skip
        if torchrun_world == 1:
            return cls(plan, spawn=True, device_type=device_type)
        info = init_from_env(device_type=device_type)
        return cls(plan, rank=info.rank, device_type=device_type)

    def run(self, ref, args, valid, record):
        """Generate on every rank; rank 0's [GenerationResult] in the main process, None on ranks > 0."""
        show = not args.quiet and _stderr_is_tty()
        if self.spawn:
            return spawn(self.plan.world, rank_generate, self.plan, ref, args, valid, record, show,
                         device_type=self.device_type)  # fmt: skip
        try:
            results = rank_generate(self.plan, ref, args, valid, record, show and self.is_main)
        except Exception as e:  # no destroy_process_group: other ranks may wait in a collective; torchrun stops them
            raise with_rank(e, self.rank, self.plan.world) from e
        dist.destroy_process_group()
        return results


def _stderr_is_tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _device_type(args, world: int, spawning: bool) -> str:
    """cuda or cpu for the ranks, from --device (a type only: rank r uses cuda:LOCAL_RANK)."""
    device = torch.device(args.device) if args.device else None
    if device is not None and device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        raise ValueError(f"--device {args.device}: in a parallel run rank r uses cuda:r (its LOCAL_RANK); pass "
                         f"--device cuda or leave it out")  # fmt: skip
    kind = rank_device_type(device.type if device is not None else None)
    if kind == "cuda" and spawning and world > torch.cuda.device_count():
        raise ValueError(f"--gpus {world}: torch sees only {torch.cuda.device_count()} CUDA GPUs")
    return kind


def check_batch(plan: Plan, spec, num_images: int) -> None:
    """Raise a ValueError naming the numbers unless every forward of the request splits over the batch ranks:
    `Pipeline.run` runs up to `MAX_BATCH` images per forward, a CFG model twice as many rows."""
    from ..pipeline import MAX_BATCH

    if spec.use_kv_cache:
        raise ValueError(f"batch parallelism does not run {spec.name}'s KV-cache forward")
    halves = 2 if spec.guidance_mode == "cfg" else 1
    sizes = {min(MAX_BATCH, num_images - i) * halves for i in range(0, num_images, MAX_BATCH)}
    bad = sorted(n for n in sizes if n % plan.batch)
    if bad:
        n = bad[0]
        rows = f"{n // 2} image(s) x 2 CFG halves = {n} rows" if halves == 2 else f"{n} row(s), one per image"
        k = plan.batch // math.gcd(plan.batch, halves)
        raise ValueError(f"batch parallelism over {plan.batch} ranks needs each forward's rows to split evenly; "
                         f"{spec.name} with --num-images {num_images} runs a forward of {rows}: use a multiple "
                         f"of {k} images, or --parallel sp / tp")  # fmt: skip


def _load_on_rank(ref, args, record, rank: int, device: torch.device, mesh=None):
    """This rank's pipeline: every component but the text encoder, which only rank 0 loads. Under tensor
    parallelism the rank reads only its shards of the transformer (`tp.sharded_loading`), also with `--quant fp8`
    (row shards then quantized with their whole rows' scales: the layers equal the whole model's fp8 layers split
    afterwards); other memory plans (4-bit, streamed blocks) load the whole model first."""
    from ..cli import _load
    from ..quant.formats import default_skip
    from .tp import quantize_row_shards, sharded_loading

    plan = getattr(args, "plan", None)
    sharded = mesh is not None and mesh.tp > 1 and (plan is None or (plan.quant == "fp8" and not plan.streamed))
    a = copy.copy(args)
    a.device = str(device)
    a.compile = a.cuda_graph = False  # compiled and graphed after the plan is applied (collectives inside)
    if rank != 0:  # --text-encoder-device / --ae-device place rank 0's components; the others keep theirs local
        a.text_encoder_device = a.ae_device = None
    split = sharded_loading(mesh.tp_group) if sharded else None
    pipe = _load(ref, a, record, load_text_encoder=rank == 0, transformer_split=split)
    if sharded and plan is not None:  # the plan quantized the column shards (whole rows) block by block
        quantize_row_shards(pipe.transformer, default_skip("fp8"), mesh.tp_group)
    pipe.text_encoder = BroadcastTextEncoder(pipe.text_encoder if rank == 0 else None, device)
    return pipe


def rank_generate(plan: Plan, ref, args, valid, record, show_progress: bool):
    """One rank's part of a parallel `fluxrt generate` (in an initialised group): load, split, run the request."""
    from ..cli import Progress

    rank, device = dist.get_rank(), _rank_device()
    mesh = make_mesh(plan.sp, plan.tp) if plan.batch == 1 else None
    pipe = _load_on_rank(ref, args, record, rank, device, mesh)
    if mesh is None:
        pipe.transformer = BatchParallel(pipe.transformer)
    else:
        pipe.transformer = parallelize(pipe.transformer, mesh, plan.attention, overlap=getattr(args, "overlap", False),
                                       transport=getattr(args, "transport", "nccl"))  # fmt: skip
    if getattr(args, "compile", False):
        from ..accel import compile_transformer

        inner = getattr(pipe.transformer, "model", pipe.transformer)  # the Flux2 inside SequenceParallel
        compile_transformer(inner, fullgraph=False)  # all-to-alls and all-reduces trace; ring's send/recv break
    if getattr(args, "cuda_graph", False):  # the whole parallel forward, collectives included, as one graph
        from ..accel import CUDAGraphStep

        pipe.transformer = CUDAGraphStep(pipe.transformer)
    progress = Progress(enabled=show_progress and rank == 0)
    try:
        results = pipe.run(valid, on_step=progress)
    finally:
        progress.close()
    return results if rank == 0 else None


def _rank_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
