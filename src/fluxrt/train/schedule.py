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


class Budget:
    def __init__(self, steps: int, seconds: float | None = None, probe: int = 20):
        self.total, self.seconds, self.probe = steps, seconds, probe
        self.start = time.time()

    def update(self, step: int) -> None:
        """Call after each step; at step `probe` the total is fitted to the time left."""
        if self.seconds is None or step + 1 != self.probe:
            return
        per_step = (time.time() - self.start) / self.probe
        self.total = min(self.total, self.probe + int((self.seconds - (time.time() - self.start)) / per_step))

    def running(self, step: int) -> bool:
        return step < self.total


def cosine_optim(params, lr: float, budget: Budget, warmup: int = 100, floor: float = 0.1, **kw):
    """AdamW with linear warm-up then cosine decay to `floor` * lr at `budget.total` steps."""
    opt = torch.optim.AdamW(params, lr=lr, **kw)

    def factor(s: int) -> float:
        progress = min(1.0, s / max(budget.total, 1))
        return min(1.0, (s + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
