"""Rectified flow / conditional flow matching (Liu et al. 2022; Lipman et al. 2023; Su parts 15–17).

The straight path x_t = (1 − t) x0 + t ε, t ∈ [0, 1], is x_t = (1 − t)(x0 + σ ε) with σ = t/(1 − t): in σ-space
s = 1 − t = 1/(1 + σ). The network regresses the velocity u = dx_t/dt = ε − x0 at time input t · T (a UNet's
sinusoidal embedding then sees the range of a T-step DDPM). ``flow_time`` and ``sigma_of_flow_time`` are the
one place the t ↔ σ map is written.
"""

from __future__ import annotations

import torch

from ..process import expand_to, target_from_x0_and_epsilon
from .base import SCHEDULE_DEFAULTS, SigmaProcess, TrainingExample


def flow_time(sigma):
    """t = σ/(1 + σ)."""
    return sigma / (1 + sigma)


def sigma_of_flow_time(t):
    """σ = t/(1 − t), the inverse of ``flow_time``."""
    return t / (1 - t)


class FlowProcess(SigmaProcess):
    """A network trained on the straight path z_t = (1 − t) x0 + t ε, time input t · T."""

    name = model_process = "flow"
    label = "rectified flow"
    config_defaults = {**SCHEDULE_DEFAULTS, "prediction_type": "velocity", "model_process": "flow"}
    # t = 0.998 at σ_max: the path is pure noise only at t = 1 (σ = ∞); starting at N(0, 1 + σ_max²) there
    # ignores x0's contribution, 0.2% of the state's scale.
    SIGMA_MIN, SIGMA_MAX = 2e-3, 500.0

    def __init__(self, prediction_type: str, num_train_timesteps: int):
        super().__init__(prediction_type)
        self.time_scale = num_train_timesteps

    @classmethod
    def from_config(cls, config) -> FlowProcess:
        return cls(config["prediction_type"], config["num_train_timesteps"])

    def training_example(self, x0, noise, time) -> TrainingExample:
        """``time``: path times t ∈ (0, 1), (B,)."""
        noisy = expand_to(1 - time, x0) * x0 + expand_to(time, x0) * noise
        target = target_from_x0_and_epsilon(self.prediction_type, x0, noise, 1 - time, time)
        return TrainingExample(noisy, time * self.time_scale, target, torch.ones(len(x0), device=x0.device))

    def input_scale(self, sigma):
        return 1 / (1 + torch.as_tensor(sigma, dtype=torch.float64))

    def timestep(self, sigma):
        return flow_time(torch.as_tensor(sigma, dtype=torch.float64)) * self.time_scale

    def sigma_of_timestep(self, timestep):
        return sigma_of_flow_time(torch.as_tensor(timestep, dtype=torch.float64) / self.time_scale)

    def sigma_range(self):
        return self.SIGMA_MIN, self.SIGMA_MAX
