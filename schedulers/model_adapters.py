"""How a trained network sees the σ-space state: its input scale, its time input, and its output as D(x; σ).

The σ-space solvers (``sigma_base.py``) walk x = x0 + σ ε and ask for the denoiser D(x; σ) = E[x0 | x]. A
network trained on another forward process sees a rescaled state and another clock (EDM, Karras et al. 2022,
§2 and Table 1: every process is x_model = s (x0 + σ ε) with its own s(σ) and time t(σ)):

* ``vp``   (DDPM):          s = ᾱ = 1/sqrt(1 + σ²), t = the discrete training step whose noise level is σ;
* ``flow`` (rectified flow): s = 1 − t = 1/(1 + σ), t = σ/(1 + σ) ∈ [0, 1), fed to the network as
  ``t · num_train_timesteps`` (Liu et al. 2022; the convention of ``train/objectives.py``'s flow objective);
* ``edm`` (EDM preconditioning, also PFGM++'s): s = c_in = 1/sqrt(σ² + σ_data²), output F_θ with
  D = c_skip x + c_out F_θ (``EDMModelAdapter``).

For vp and flow, the network's input is x_model = ᾱ x0 + β̄ ε with (ᾱ, β̄) = (s, s σ), so
``process.to_x0_and_epsilon`` decodes any parameterization (ε, x0, v, score, flow velocity) into x̂0 = D.
A new process is one more ``ModelAdapter`` in ``MODEL_ADAPTERS``; every σ-space sampler then drives its models.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from .process import VPSchedule, to_x0_and_epsilon


class ModelAdapter(ABC):
    """The map between σ-space and one training process's network inputs and outputs."""

    def __init__(self, prediction_type: str):
        self.prediction_type = prediction_type

    @abstractmethod
    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """s(σ): the network sees s · x_ve."""

    @abstractmethod
    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The time input the network was trained with at noise level σ."""

    @abstractmethod
    def sigma_of_timestep(self, timestep) -> torch.Tensor:
        """The inverse of ``timestep``: the noise level σ at which the network was given this time input."""

    def coefficients(self, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ, β̄) of the network's input x_model = ᾱ x0 + β̄ ε at a time input: ᾱ = s(σ), β̄ = s(σ) σ."""
        sigma = self.sigma_of_timestep(timestep)
        scale = self.input_scale(sigma)
        return scale, scale * sigma

    @abstractmethod
    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max) the network was trained on: the default ends of a sampling grid."""

    def denoised(self, output: torch.Tensor, x_ve: torch.Tensor, sigma) -> torch.Tensor:
        """D(x_ve; σ) from the network's ``output`` at input s · x_ve."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        scale = self.input_scale(sigma)
        x0, _ = to_x0_and_epsilon(self.prediction_type, output.to(x_ve.dtype), x_ve * scale.to(x_ve.dtype),
                                  scale, sigma * scale)
        return x0

    def denoise(self, model_call, x_ve: torch.Tensor, sigma) -> torch.Tensor:
        """D(x_ve; σ) by calling ``model_call(network input, time)``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        output = model_call(x_ve * self.input_scale(sigma).to(x_ve.dtype), self.timestep(sigma))
        return self.denoised(output, x_ve, sigma)


class VPModelAdapter(ModelAdapter):
    """A network trained on a discrete VP schedule (DDPM): input ᾱ x_ve at the fractional step t(σ)."""

    def __init__(self, prediction_type: str, schedule: VPSchedule):
        super().__init__(prediction_type)
        self.schedule = schedule

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


class FlowModelAdapter(ModelAdapter):
    """A network trained on the straight path z_t = (1 − t) x0 + t ε, t ∈ [0, 1], time input t · T."""

    # t = 0.998 at σ_max: the path is pure noise only at t = 1 (σ = ∞); starting at N(0, 1 + σ_max²) there
    # ignores x0's contribution, 0.2% of the state's scale.
    SIGMA_MIN, SIGMA_MAX = 2e-3, 500.0

    def __init__(self, prediction_type: str, num_train_timesteps: int):
        super().__init__(prediction_type)
        self.time_scale = num_train_timesteps

    def input_scale(self, sigma):
        return 1 / (1 + torch.as_tensor(sigma, dtype=torch.float64))

    def timestep(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return sigma / (1 + sigma) * self.time_scale

    def sigma_of_timestep(self, timestep):
        t = torch.as_tensor(timestep, dtype=torch.float64) / self.time_scale
        return t / (1 - t)

    def sigma_range(self):
        return self.SIGMA_MIN, self.SIGMA_MAX


class EDMModelAdapter(ModelAdapter):
    """A network F_θ trained with EDM's preconditioning (Karras et al. 2022, Table 1, "ours"), σ_data = 0.5:

        D(x; σ) = c_skip x + c_out F_θ(c_in x; c_noise),   c_skip = σ_d²/(σ² + σ_d²),
        c_out = σ σ_d/sqrt(σ² + σ_d²),   c_in = 1/sqrt(σ² + σ_d²),   c_noise = ¼ ln σ.

    Models of the ``edm`` objective (Gaussian kernel, D = ∞) and of PFGM++ (``pfgmpp``: the same denoiser
    under the kernel with D extra dimensions, r = σ√D; Xu et al. 2023) are both such networks. A
    UNet2DModel's sinusoidal embedding has its fastest frequency at 1 rad per unit of time, so it would barely
    tell c_noise ∈ [−1.55, 1.10] (σ ∈ [0.002, 80]) apart; the time input is the affine image of c_noise that
    spans a DDPM's range, t = 1000 (c_noise − ¼ ln σ_min)/(¼ ln σ_max − ¼ ln σ_min), 0 at σ = 0.002 and 1000
    at σ = 80 (σ outside the range extrapolates linearly). The output is F_θ (``prediction_type="edm"``).
    """

    SIGMA_DATA = 0.5
    SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's sampling range; the time map's ends
    TIME_SCALE = 1000.0

    def __init__(self, prediction_type: str = "edm"):
        if prediction_type != "edm":
            raise ValueError(f"an EDM-preconditioned model outputs F_θ (prediction_type 'edm'), "
                             f"got {prediction_type!r}")
        super().__init__(prediction_type)

    def input_scale(self, sigma):
        return 1 / (torch.as_tensor(sigma, dtype=torch.float64) ** 2 + self.SIGMA_DATA**2).sqrt()

    def skip_and_out(self, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at σ."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        total = sigma**2 + self.SIGMA_DATA**2
        return self.SIGMA_DATA**2 / total, sigma * self.SIGMA_DATA / total.sqrt()

    def timestep(self, sigma):
        log_sigma = torch.log(torch.as_tensor(sigma, dtype=torch.float64))
        low, high = math.log(self.SIGMA_MIN), math.log(self.SIGMA_MAX)
        return self.TIME_SCALE * (log_sigma - low) / (high - low)

    def sigma_of_timestep(self, timestep) -> torch.Tensor:
        """The inverse of ``timestep``."""
        low, high = math.log(self.SIGMA_MIN), math.log(self.SIGMA_MAX)
        return torch.exp(low + torch.as_tensor(timestep, dtype=torch.float64) / self.TIME_SCALE * (high - low))

    def sigma_range(self):
        return self.SIGMA_MIN, self.SIGMA_MAX

    def denoised(self, output, x_ve, sigma):
        skip, out = self.skip_and_out(sigma)
        return skip.to(x_ve.dtype) * x_ve + out.to(x_ve.dtype) * output.to(x_ve.dtype)


# model_process → the adapter built from a scheduler config and its VP schedule.
MODEL_ADAPTERS = {
    "vp": lambda config, schedule: VPModelAdapter(config["prediction_type"], schedule),
    "flow": lambda config, schedule: FlowModelAdapter(config["prediction_type"], config["num_train_timesteps"]),
    "edm": lambda config, schedule: EDMModelAdapter(config["prediction_type"]),
}


def make_model_adapter(config, schedule: VPSchedule) -> ModelAdapter:
    """The adapter for a scheduler config's ``model_process`` (default ``vp``)."""
    process = config.get("model_process", "vp")
    if process not in MODEL_ADAPTERS:
        raise ValueError(f"unknown model_process {process!r}; choose one of {tuple(MODEL_ADAPTERS)}")
    return MODEL_ADAPTERS[process](config, schedule)
