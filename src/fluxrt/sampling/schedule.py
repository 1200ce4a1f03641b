"""The FLUX.2 time schedule: an empirical, resolution- and step-dependent shift of linspace(1, 0, n+1)."""

from __future__ import annotations

import math

import torch

# Fitted constants of the reference `compute_empirical_mu`: mu is linear in the token count L, and below
# 4300 tokens also linear in the step count, through (10 steps, a1 L + b1) and (200 steps, a2 L + b2).
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 0.00016927, 0.45666666


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Shift parameter mu for `image_seq_len` output tokens (references not counted) and `num_steps`."""
    m200 = _A2 * image_seq_len + _B2
    if image_seq_len > 4300:
        return m200
    m10 = _A1 * image_seq_len + _B1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return a * num_steps + b


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """t -> e^mu / (e^mu + (1/t - 1)^sigma); keeps t = 1 and t = 0 fixed."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 decreasing times from 1.0 (noise) to 0.0 (data), computed in fp32."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    return time_shift(compute_empirical_mu(image_seq_len, num_steps), 1.0, t).tolist()
