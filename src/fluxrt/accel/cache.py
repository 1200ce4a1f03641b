"""Step cache (lossy, opt-in): skip a step's later blocks when its first block changed little since the last full step.

`apply_step_cache(model, threshold)` changes how a built `Flux2` runs its blocks, from outside the model file. At
every step the first double block runs as usual and its change to the image stream (its residual, (B, L_img, H))
is compared with the residual of the last step that ran every block:

    rel = mean |residual - residual_full| / mean |residual_full|

If rel < threshold, the later blocks are skipped and the change they made to the image stream at that full step
is added instead (img_1 + delta_full); otherwise every block runs and both are stored. Neighbouring flow steps
are close, so a small change at the first block means a small change downstream; the first step of a run always
runs in full, and since the comparison is always with the last full step the error cannot creep in step by step.
Cost of a skipped step: one block of the model's 2 + 48 (dev) or so, plus one host sync for the decision.

A new run is recognised by its timestep not decreasing (or a new shape), so `sample()` calls need no reset.
The klein 9B KV forward (`kv=`) always runs in full. Under a parallel wrapper each rank holds part of the tokens
(sequence parallel) or rows (batch parallel): `share_step_cache(wrapper, model, group)`, called by the wrappers,
makes the ranks decide together from the sums of both terms over the group (one all-reduce of two numbers per
step), so they skip the same steps; zero-padded tokens of a sequence that the ranks do not divide evenly count in
those sums. `StepCache` counts steps and skipped steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StepCache:
    threshold: float
    residual: torch.Tensor | None = None  # first block's change to the image stream at the last full step
    delta: torch.Tensor | None = None  # what the later blocks added to the image stream at that step
    last_t: float | None = None
    group: object = None  # a process group whose ranks decide together (`share_step_cache`); None: alone
    steps: int = 0  # forwards seen (over every run since the counters were last cleared)
    skipped: int = 0  # of which ran only the first block
    handle: object = field(default=None, repr=False)

    def new_step(self, t: float) -> None:
        if self.last_t is None or t >= self.last_t:  # t runs from 1 to 0 within one run
            self.residual = self.delta = None
        self.last_t = t
        self.steps += 1

    def reusable(self, residual: torch.Tensor) -> bool:
        prev = self.residual
        if prev is None or prev.shape != residual.shape:
            return False
        sums = torch.stack([(residual - prev).abs().float().sum(), prev.abs().float().sum()])  # rel = their ratio
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(sums, group=self.group)
        return (sums[0] / sums[1].clamp_min(1e-12)).item() < self.threshold

    def clear_counts(self) -> None:
        self.steps = self.skipped = 0


def apply_step_cache(model: nn.Module, threshold: float) -> StepCache:
    """Cache the later blocks' output of a built `Flux2` across steps (see the module docstring); returns the
    cache state. `remove_step_cache(model)` undoes it."""
    if not threshold > 0:
        raise ValueError(f"step cache threshold must be > 0 (e.g. 0.1), got {threshold!r}")
    if len(getattr(model, "double_blocks", ())) == 0:
        raise ValueError(f"the step cache needs a FLUX.2 transformer with double blocks, got {type(model).__name__}")
    if getattr(model, "step_cache", None) is not None:
        remove_step_cache(model)
    state = StepCache(float(threshold))
    state.handle = model.register_forward_pre_hook(functools.partial(_pre_forward, state), with_kwargs=True)
    model.step_cache = state
    model.run_blocks = functools.partial(_run_blocks, model, state)  # an instance attribute: the class is unchanged
    return state


def share_step_cache(wrapper: nn.Module, model: nn.Module, group) -> None:
    """For a parallel wrapper of `model`: if `model` has a step cache, its ranks in `group` decide together, and the
    wrapper exposes the cache state as `wrapper.step_cache` (what `Pipeline.run` records)."""
    state = getattr(model, "step_cache", None)
    if state is not None:
        state.group = group
        wrapper.step_cache = state


def remove_step_cache(model: nn.Module) -> None:
    state = getattr(model, "step_cache", None)
    if state is None:
        return
    state.handle.remove()
    del model.run_blocks
    model.step_cache = None


def _pre_forward(state: StepCache, module, args, kwargs):
    t = args[2] if len(args) > 2 else kwargs["timesteps"]
    state.new_step(float(t.reshape(-1)[0]))


def _run_blocks(model, state: StepCache, img, txt, pe, mods, kv=None) -> torch.Tensor:
    """`Flux2.run_blocks` with the first double block split off and the rest skipped when reusable."""
    if kv is not None:  # the KV variant's reference K/V must be read by every block
        return type(model).run_blocks(model, img, txt, pe, mods, kv)
    first, *rest = model.double_blocks
    img_1, txt = first(img, txt, pe, mods.img, mods.txt)
    residual = img_1 - img
    if state.reusable(residual):
        state.skipped += 1
        return img_1 + state.delta
    img = img_1
    for block in rest:  # from here as in Flux2.run_blocks
        img, txt = block(img, txt, pe, mods.img, mods.txt)
    n_txt = txt.shape[1]
    seq = torch.cat([txt, img], dim=1)  # (B, L_txt + L_img, H)
    for block in model.single_blocks:
        seq = block(seq, pe, mods.single, n_txt)
    out = seq[:, n_txt:]
    state.residual, state.delta = residual, out - img_1
    return out
