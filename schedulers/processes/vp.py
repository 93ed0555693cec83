"""The discrete variance-preserving process (DDPM, Ho et al. 2020): x_t = ᾱ_t x0 + β̄_t ε on T integer steps.

In σ-space s = ᾱ = 1/sqrt(1 + σ²) and the time input is the (fractional) training step whose noise level is σ
(``VPSchedule.timestep_of_sigma``). The network regresses ε, x0 or v (``process.target_from_x0_and_epsilon``).
"""

from __future__ import annotations

import torch

from ..process import VPSchedule, expand_to, target_from_x0_and_epsilon
from .base import SCHEDULE_DEFAULTS, SigmaProcess, TrainingExample

# Keys of the sampling grid the model's own discrete scheduler was shipped with; DDPM/DDIM samplers inherit them.
# (x̂0 clipping is not inherited: it is every sampler's own knob, ``registry.CLIPPING_KNOBS``, off by default.)
DISCRETE_GRID_KEYS = ("timestep_spacing", "steps_offset")


def min_snr_weight(alpha: torch.Tensor, beta: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", eq. 10).

    In x0 terms the weight is min(SNR, γ) with SNR = ᾱ²/β̄². Since ‖ε − ε̂‖² = SNR ‖x0 − x̂0‖² and
    ‖v − v̂‖² = (SNR + 1) ‖x0 − x̂0‖², the ε loss takes min(SNR, γ)/SNR and the v loss min(SNR, γ)/(SNR + 1).
    """
    snr = (alpha / beta) ** 2
    clipped = snr.clamp(max=gamma)
    divisors = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}
    if prediction_type not in divisors:
        raise ValueError(f"min-SNR weighting is defined for {tuple(divisors)}, got {prediction_type!r}")
    return clipped / divisors[prediction_type]


class VPProcess(SigmaProcess):
    """A network trained on a discrete VP schedule: input ᾱ x_ve at the fractional step t(σ)."""

    name = model_process = "vp"
    label = "VP"
    config_defaults = {**SCHEDULE_DEFAULTS, "model_process": "vp"}

    def __init__(self, prediction_type: str, schedule: VPSchedule, snr_gamma: float | None = None):
        super().__init__(prediction_type)
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma (min-SNR-γ weighting) must be positive or None (off), got {snr_gamma}")
        self.schedule = schedule
        self.snr_gamma = snr_gamma

    @classmethod
    def from_config(cls, config) -> VPProcess:
        return cls(config["prediction_type"], VPSchedule.from_config(config))

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        return (*super().config_keys(), *DISCRETE_GRID_KEYS)

    def training_example(self, x0, noise, time) -> TrainingExample:
        """``time``: integer training steps, (B,); the loss weight is min-SNR-γ's when ``snr_gamma`` is set, else 1."""
        alpha, beta = self.schedule.coefficients(time)
        alpha, beta = alpha.to(x0.device), beta.to(x0.device)
        noisy = expand_to(alpha, x0) * x0 + expand_to(beta, x0) * noise
        target = target_from_x0_and_epsilon(self.prediction_type, x0, noise, alpha, beta)
        weight = (torch.ones(len(x0)) if self.snr_gamma is None
                  else min_snr_weight(alpha, beta, self.prediction_type, self.snr_gamma).float())
        return TrainingExample(noisy, time.to(x0.device), target, weight.to(x0.device))

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
