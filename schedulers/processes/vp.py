"""The discrete variance-preserving process (DDPM, Ho et al. 2020): x_t = ᾱ_t x0 + β̄_t ε on T integer steps.

In σ-space s = ᾱ = 1/sqrt(1 + σ²) and the time input is the (fractional) training step whose noise level is σ
(``VPSchedule.timestep_of_sigma``). The network regresses ε, x0 or v (``process.target_from_x0_and_epsilon``).
"""

from __future__ import annotations

import torch

from ..process import VPSchedule, expand_to, target_from_x0_and_epsilon
from .base import SCHEDULE_DEFAULTS, SigmaProcess, TrainingExample

# Keys of the sampling grid the model's own discrete scheduler was shipped with; DDPM/DDIM samplers inherit them.
DISCRETE_GRID_KEYS = ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range")


class VPProcess(SigmaProcess):
    """A network trained on a discrete VP schedule: input ᾱ x_ve at the fractional step t(σ)."""

    name = model_process = "vp"
    label = "VP"
    config_defaults = {**SCHEDULE_DEFAULTS, "model_process": "vp"}

    def __init__(self, prediction_type: str, schedule: VPSchedule):
        super().__init__(prediction_type)
        self.schedule = schedule

    @classmethod
    def from_config(cls, config) -> VPProcess:
        return cls(config["prediction_type"], VPSchedule.from_config(config))

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        return (*super().config_keys(), *DISCRETE_GRID_KEYS)

    def training_example(self, x0, noise, time) -> TrainingExample:
        """``time``: integer training steps, (B,)."""
        alpha, beta = self.schedule.coefficients(time)
        alpha, beta = alpha.to(x0.device), beta.to(x0.device)
        noisy = expand_to(alpha, x0) * x0 + expand_to(beta, x0) * noise
        target = target_from_x0_and_epsilon(self.prediction_type, x0, noise, alpha, beta)
        return TrainingExample(noisy, time.to(x0.device), target, torch.ones(len(x0), device=x0.device))

    def input_scale(self, sigma):
        return 1 / (1 + torch.as_tensor(sigma, dtype=torch.float64) ** 2).sqrt()

    def timestep(self, sigma):
        return self.schedule.timestep_of_sigma(sigma)

    def sigma_of_timestep(self, timestep):
        return self.schedule.sigma(torch.as_tensor(timestep, dtype=torch.float64))

    def coefficients(self, timestep):
        return self.schedule.coefficients(timestep)  # the schedule's own (ᾱ, β̄), without a detour through σ

    def sigma_range(self):
        last = torch.tensor(self.schedule.num_train_timesteps - 1)
        return float(self.schedule.sigma(torch.tensor(0))), float(self.schedule.sigma(last))
