"""Step budgets and learning-rate schedules for the trainers.

`Budget(steps, seconds)` caps a loop by a step count and by wall time: after a few steps it measures the step
time and shrinks `total` so the loop ends inside `seconds`; the cosine schedule follows the shrunken total, so
a time-capped run still anneals its learning rate. The final step count is logged so a run can be repeated
with a fixed count.
"""

from __future__ import annotations

import math
import time

import torch


def _sync() -> None:
    """Wait for queued GPU work: the host runs ahead of a GPU, so unsynchronised step times are too short (a
    compiled teacher's probe read 25 ms/step for 35 real and overran its budget by a third)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Budget:
    def __init__(self, steps: int, seconds: float | None = None, probe: int = 30, skip: int = 10):
        self.total = self.cap = steps
        self.seconds, self.probe, self.skip = seconds, probe, skip
        self.start = self.t_skip = time.time()

    def update(self, step: int) -> None:
        """Call after each step; at step `probe` the total is fitted to the time left, timing steps skip..probe
        only (the first steps pay for CUDA start-up and autotuning and would shrink the run by a third), and
        refitted at steps 2, 4, 8, ... x `probe` on all steps since `skip` (a mix of batch shapes whose slow ones
        the probe missed overran a 240 s budget by 10%)."""
        if self.seconds is None:
            return
        if step + 1 == self.skip:
            _sync()
            self.t_skip = time.time()
        n = step + 1
        if n < self.probe or n % self.probe or (n // self.probe) & (n // self.probe - 1):
            return  # fits at probe x 1, 2, 4, 8, ...
        _sync()
        now = time.time()
        per_step = (now - self.t_skip) / (n - self.skip)
        self.total = max(n, min(self.cap, n + int((self.seconds - (now - self.start)) / per_step)))

    def running(self, step: int) -> bool:
        return step < self.total

    def tick(self, step: int, log, every: int, message) -> int:
        """After `step`: fit the budget, log `message()` every `every` steps and at the last; returns step + 1."""
        self.update(step)
        if step % every == 0 or step == self.total - 1:
            log(f"{message()} (step {step}/{self.total})")
        return step + 1


def optimizer_step(opt, sched, loss: torch.Tensor, clip_params=None, clip: float = 1.0) -> None:
    """Backward, optional gradient clipping, optimizer and scheduler step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, clip)
    opt.step()
    sched.step()


def cosine_optim(params, lr: float, budget: Budget, warmup: int = 100, floor: float = 0.1, **kw):
    """AdamW with linear warm-up then cosine decay to `floor` * lr at `budget.total` steps."""
    opt = torch.optim.AdamW(params, lr=lr, **kw)

    def factor(s: int) -> float:
        progress = min(1.0, s / max(budget.total, 1))
        return min(1.0, (s + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
