"""Rectified-flow training of the embedded model's transformer, then guidance distillation.

Teacher: x_t = (1 - t) x0 + t eps, target v = eps - x0 (FLUX.2's convention, t = 1 is noise), text dropped
with probability `p_uncond` (the empty prompt's features) so real CFG works. References are appended after the
image tokens un-noised with ids (10 + 10 i, y, x, 0), exactly as FLUX.2 conditions them.
Student (the [dev] path): the same network plus a guidance embedding, trained to output the teacher's CFG
velocity u + g (c - u) in one forward, for g drawn as `DistillRecipe` says.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sampling.latents import REF_T_SCALE, grid_ids, text_ids
from ..sampling.schedule import time_shift
from .schedule import Budget, cosine_optim, optimizer_step


@dataclass
class LatentSet:
    """Everything a training step draws from, on the training device."""

    tokens: torch.Tensor  # (N, L, 128) normalised latent tokens of every rendered scene
    ctx: torch.Tensor  # (P, T, C) text features of every prompt
    empty_ctx: torch.Tensor  # (1, T, C) features of the empty prompt
    groups: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # n_refs -> (target, refs, prompt) idx
    side: int  # latent grid side, L = side * side
    mu: float  # schedule shift used at inference for this size (training times follow it)


def batch_ids(data: LatentSet, n_refs: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L * (1 + n_refs), 4) image+reference ids and (1, T, 4) text ids."""
    ids = [grid_ids(data.side, data.side, 0, device)]
    ids += [grid_ids(data.side, data.side, REF_T_SCALE * (i + 1), device) for i in range(n_refs)]
    return torch.cat(ids)[None], text_ids(data.ctx.shape[1], device)[None]


def draw(data: LatentSet, batch: int, gen: torch.Generator, n_refs: int | None = None, ref_boost: float = 1.0):
    """A batch from one reference-count group, chosen in proportion to its size (groups with references
    `ref_boost` times more often) unless `n_refs` is given."""
    if n_refs is None:
        keys = sorted(data.groups)
        sizes = torch.tensor([len(data.groups[k][0]) * (ref_boost if k else 1.0) for k in keys], dtype=torch.float)
        n_refs = keys[int(torch.multinomial(sizes, 1, generator=gen))]
    tgt, refs, prompt = data.groups[n_refs]
    pick = torch.randint(len(tgt), (batch,), generator=gen).to(tgt.device)
    x0 = data.tokens[tgt[pick]].float()
    ref = data.tokens[refs[pick]].flatten(1, 2).float() if n_refs else None  # (B, n_refs * L, 128)
    return n_refs, x0, ref, data.ctx[prompt[pick]].float()


def sample_t(batch: int, device, gen: torch.Generator, mu: float, tail: float = 0.1) -> torch.Tensor:
    """Training times: a third logit-normal and a third uniform, both shifted by the inference schedule's mu, and
    a third at 1 - tail * u^2 (u uniform), packed against pure noise.

    The shift must match sampling, and the tail is where the text matters: at 256² an image's background and
    object colours can be read off x_t up to t ~ 0.97, so only the first sampling steps (t = 1, 0.993, 0.985, ...)
    depend on the prompt, and a shifted distribution alone puts ~10% of its samples there.
    """
    kind = torch.randint(3, (batch,), generator=gen)
    u = torch.where(kind == 0, torch.sigmoid(torch.randn(batch, generator=gen)), torch.rand(batch, generator=gen))
    t = time_shift(mu, 1.0, u)
    t = torch.where(kind == 2, 1 - tail * torch.rand(batch, generator=gen) ** 2, t)
    return t.to(device).clamp(1e-4, 1 - 1e-4)


def velocity(model, xt, ref, ids, t, ctx, ctx_ids, guidance=None):
    x = xt if ref is None else torch.cat([xt, ref], dim=1)
    b = xt.shape[0]
    return model(x, ids.expand(b, -1, -1), t, ctx, ctx_ids.expand(b, -1, -1), guidance=guidance)[:, : xt.shape[1]]


class EMA:
    """Exponential moving average of the weights with warm-up: decay min(d, (1 + n) / (10 + n)) at update n,
    so a short run is not dominated by its random initialisation."""

    def __init__(self, model, decay: float):
        self.decay, self.n, self.model = decay, 0, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        self.n += 1
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - d)


def noise_generator(dev: torch.device, seed: int) -> torch.Generator:
    """The generator of the per-step noise, on the training device: drawing a batch of noise on the host and
    copying it over cost as much as the step itself on a GPU."""
    return torch.Generator(device=dev).manual_seed(seed + 7919)


def forward_fn(model, compile: bool, scope: str = "model"):
    """`model`, or it compiled: scope "model" returns a torch.compile'd view sharing its parameters (one graph per
    reference count), scope "blocks" compiles each block in place (`fluxrt.accel.compile.compile_regions`): one
    graph per block class, reference count and grad mode, with the embedders eager.

    The teacher's training steps run 3.1x faster compiled whole on an H200 (99 -> 32 ms at batch 256;
    `bench/train_speed.py`). The student's step (the teacher's no-grad forward and the student's training forward)
    compiled whole ran 67 ms instead of 212 on an H100, but its eight graphs took 214 s to compile from a cold
    cache, most of the stage's budget; per block (two distinct blocks, not seven) 72 ms after 141 s.
    """
    if not compile:
        return model
    if scope == "model":
        return torch.compile(model, dynamic=False)
    from ..accel.compile import compile_regions

    # per block class: reference counts x (student training, teacher no-grad) graphs, past dynamo's default 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for region in compile_regions(model, scope):
        region.compile(dynamic=False, fullgraph=True)
    return model


def teacher_batch(data: LatentSet, batch: int, gen, noise, p_uncond: float, n_refs: int | None = None):
    """(n_refs, x_t, references, t, text features with caption dropout, target velocity) of one teacher step."""
    dev = data.tokens.device
    n_refs, x0, ref, ctx = draw(data, batch, gen, n_refs)
    drop = (torch.rand(batch, generator=gen) < p_uncond).to(dev)
    ctx = torch.where(drop[:, None, None], data.empty_ctx.float(), ctx)
    t = sample_t(batch, dev, gen, data.mu)
    eps = torch.randn(x0.shape, generator=noise, device=dev)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    return n_refs, xt, ref, t, ctx, eps - x0


def teacher_loss(fn, data: LatentSet, drawn) -> torch.Tensor:
    """The flow-matching loss of `fn` on a `teacher_batch`."""
    n_refs, xt, ref, t, ctx, target = drawn
    dev = xt.device
    ids, ctx_ids = batch_ids(data, n_refs, dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        pred = velocity(fn, xt, ref, ids, t, ctx, ctx_ids)
    return F.mse_loss(pred.float(), target)


def warm_up(data: LatentSet, params, loss_for) -> None:
    """Run `loss_for(gen, noise, n_refs)` forward and backward for every reference count, on batches built exactly
    as training builds them (torch.compile specialises on strides too), so every graph is compiled before the step
    budget is fitted; uses its own generators and drops the gradients of `params`."""
    gen, noise = torch.Generator().manual_seed(0), torch.Generator(device=data.tokens.device).manual_seed(0)
    for n in sorted(data.groups):
        loss_for(gen, noise, n).backward()
    for p in params:
        p.grad = None


def train_teacher(model, data: LatentSet, budget: Budget, batch, lr=5e-4, p_uncond=0.1, ema=0.999, seed=0,
                  log=print, compile: bool = False):  # fmt: skip
    """Flow-matching training with caption dropout; returns the EMA model."""
    dev = data.tokens.device
    gen, noise = torch.Generator().manual_seed(seed), noise_generator(dev, seed)
    opt, sched = cosine_optim(model.parameters(), lr, budget, warmup=200, betas=(0.9, 0.99))
    avg = EMA(model, ema)
    model.train()
    fn = forward_fn(model, compile)
    if compile:
        warm_up(data, model.parameters(),
                lambda gen, noise, n: teacher_loss(fn, data, teacher_batch(data, batch, gen, noise, p_uncond, n)))  # fmt: skip
    step = 0
    while budget.running(step):
        drawn = teacher_batch(data, batch, gen, noise, p_uncond)
        loss = teacher_loss(fn, data, drawn)
        optimizer_step(opt, sched, loss, model.parameters())
        avg.update(model)
        step = budget.tick(step, log, 250, lambda: f"teacher refs {drawn[0]} loss {loss.item():.4f}")
    return avg.model


def student_from_teacher(teacher, student):
    """Copy every teacher weight into the student; its new guidance embedding starts as a zero function."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("guidance_in.") for k in missing):
        raise ValueError(f"teacher and student differ beyond guidance_in: {missing} {unexpected}")
    torch.nn.init.zeros_(student.guidance_in.out_layer.weight)
    return student


@dataclass(frozen=True)
class DistillRecipe:
    """How the student is distilled. `g_range`: guidance drawn uniformly from it, except a `g_fixed_frac` share of
    each batch at `g_fixed` (the default guidance: where the model is used most). `focus`: a token's loss weight is
    1 + focus * |c - u|^2 / mean |c - u|^2 over the sample's tokens, so the tokens that guidance changes (the
    edited object of an edit: ~7% of an image's tokens, yet where its colour is decided) count for more than the
    copied rest. `ref_boost`: reference batches drawn this many times more often than their share of examples."""

    lr: float = 5e-4
    g_range: tuple[float, float] = (1.0, 6.0)
    g_fixed: float = 4.0
    g_fixed_frac: float = 0.0
    focus: float = 0.0
    ref_boost: float = 1.5
    ema: float = 0.999


def student_batch(data: LatentSet, batch: int, gen, noise, recipe: DistillRecipe, n_refs: int | None = None):
    """(n_refs, x_t, references, t, text features, guidance) of one distillation step."""
    dev = data.tokens.device
    n_refs, x0, ref, ctx = draw(data, batch, gen, n_refs, recipe.ref_boost)
    t = sample_t(batch, dev, gen, data.mu)
    lo, hi = recipe.g_range
    g = lo + (hi - lo) * torch.rand(batch, generator=gen)
    g = torch.where(torch.rand(batch, generator=gen) < recipe.g_fixed_frac, recipe.g_fixed, g).to(dev)
    eps = torch.randn(x0.shape, generator=noise, device=dev)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    return n_refs, xt, ref, t, ctx, g


def distill_loss(student_fn, teacher_fn, data: LatentSet, drawn, recipe: DistillRecipe) -> torch.Tensor:
    """The student's (focus-weighted) squared error against the teacher's CFG velocity u + g (c - u)."""
    n_refs, xt, ref, t, ctx, g = drawn
    dev = xt.device
    ids, ctx_ids = batch_ids(data, n_refs, dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        with torch.no_grad():
            both = velocity(teacher_fn, xt.repeat(2, 1, 1), None if ref is None else ref.repeat(2, 1, 1), ids,
                            t.repeat(2), torch.cat([data.empty_ctx.float().expand_as(ctx), ctx]), ctx_ids)
            uncond, cond = both.float().chunk(2)
            target = uncond + g[:, None, None] * (cond - uncond)
        pred = velocity(student_fn, xt, ref, ids, t, ctx, ctx_ids, guidance=g)
    err = (pred.float() - target).pow(2).mean(-1)  # (B, L)
    if recipe.focus:
        d = (cond - uncond).pow(2).sum(-1)
        err = err * (1 + recipe.focus * d / d.mean(1, keepdim=True).clamp_min(1e-12)) / (1 + recipe.focus)
    return err.mean()


def distill_student(student, teacher, data: LatentSet, budget: Budget, batch, recipe: DistillRecipe | None = None,
                    seed=1, log=print, compile: bool = False):  # fmt: skip
    """Train `student(x, t, c, g)` to match the teacher's u + g (c - u); returns the EMA student. With `compile`,
    the teacher's no-grad forward and the student's training forward are compiled, warmed up on a batch of every
    reference count built exactly like training's before the budget is fitted."""
    recipe = recipe or DistillRecipe()
    dev = data.tokens.device
    gen, noise = torch.Generator().manual_seed(seed), noise_generator(dev, seed)
    opt, sched = cosine_optim(student.parameters(), recipe.lr, budget, warmup=100, betas=(0.9, 0.99))
    avg = EMA(student, recipe.ema)
    teacher.eval().requires_grad_(False)
    student.train()
    student_fn, teacher_fn = forward_fn(student, compile, "blocks"), forward_fn(teacher, compile, "blocks")
    if compile:
        warm_up(data, student.parameters(), lambda gen, noise, n: distill_loss(
            student_fn, teacher_fn, data, student_batch(data, batch, gen, noise, recipe, n), recipe))  # fmt: skip
    step = 0
    while budget.running(step):
        drawn = student_batch(data, batch, gen, noise, recipe)
        loss = distill_loss(student_fn, teacher_fn, data, drawn, recipe)
        optimizer_step(opt, sched, loss, student.parameters())
        avg.update(student)
        step = budget.tick(step, log, 250, lambda: f"student refs {drawn[0]} loss {loss.item():.4f}")
    return avg.model
