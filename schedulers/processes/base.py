"""What a forward process owns (EDM's Precond + Loss pair, Karras et al. 2022, Table 1 and §5).

A ``Process`` is one way data x0 becomes the network's input, seen from both ends:

* training: the network input, time input, regression target and loss weight for a clean batch, its noise and
  a time drawn by the objective (``training_example``);
* sampling: for a ``SigmaProcess``, the map to the σ-space state x_ve = x0 + σ ε every σ-space solver walks —
  the network sees x_model = s(σ) x_ve at time t(σ), and its output decodes into the denoiser D(x_ve; σ);
* configuration: ``config_defaults`` are the scheduler config keys that describe it, with their defaults. Every
  scheduler that drives the process takes them as constructor parameters (``takes_process_config``), and a
  sampler built for a model inherits them from the model's scheduler (``registry.TRAINING_KEYS``).

For vp and flow the network's input is x_model = ᾱ x0 + β̄ ε with (ᾱ, β̄) = (s, s σ), so
``process.to_x0_and_epsilon`` decodes any parameterization (ε, x0, v, score, flow velocity) into x̂0 = D.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch

from ..process import expand_to, target_from_x0_and_epsilon, to_x0_and_epsilon

# The discrete VP schedule block: every scheduler has it (σ-space grids uniform in t and UDM's noise operator read it).
SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                     "trained_betas": None, "prediction_type": "epsilon"}


class TrainingExample(NamedTuple):
    """A noised batch as the network sees it: input, time input, regression target, per-sample loss weight."""

    network_input: torch.Tensor
    time_input: torch.Tensor
    target: torch.Tensor
    loss_weight: torch.Tensor


class Process(ABC):
    """One forward process: how a clean batch is noised for training and which config keys describe it."""

    name: str  # the ``process`` a model records (``model_info``) and the registry's ``processes`` list
    label: str  # how the app names its objectives
    config_defaults: dict[str, Any] = SCHEDULE_DEFAULTS

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The scheduler config keys a sampler built for this process's models inherits from them."""
        return tuple(cls.config_defaults)

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> Process:
        """The process a scheduler config describes."""

    @abstractmethod
    def training_example(self, x0: torch.Tensor, noise: torch.Tensor, time: torch.Tensor) -> TrainingExample:
        """Noise ``x0`` with ``noise`` at the process's own ``time`` (each subclass says which variable it is)."""


class SigmaProcess(Process):
    """A process whose models every σ-space solver drives: x_model = s(σ) (x0 + σ ε) at a time input t(σ)."""

    model_process: str  # the scheduler config's ``model_process`` value that selects it
    gaussian = True  # the kernel is Gaussian, so samplers that draw Gaussian noise fit it (not PFGM++'s)

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

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """The σ-space state x_ve = x0 + σ ε at noise level ``sigma`` (scalar or one per sample); ``noise`` is the
        kernel's draw at σ = 1 (standard normal for a Gaussian process; PFGM++'s scales linearly in σ)."""
        return x0 + expand_to(torch.as_tensor(sigma, dtype=torch.float64), x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """The v-prediction target ᾱ ε − β̄ x0 of the network's input at σ (Salimans & Ho 2022); only a VP
        process has one."""
        if self.model_process != "vp":
            raise ValueError(f"get_velocity is the VP process's v-prediction target; this model's process is "
                             f"{self.model_process!r}")
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        scale = self.input_scale(sigma)
        return target_from_x0_and_epsilon("v_prediction", x0, noise, expand_to(scale, x0), expand_to(scale * sigma, x0))

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


def takes_process_config(defaults: dict[str, Any]):
    """Give a scheduler's ``__init__`` the process config keys ``defaults`` as parameters before its own.

    diffusers' ``ConfigMixin`` reads a scheduler's config keys off its ``__init__`` signature (``from_config``,
    ``save_pretrained``); this writes that signature once per process instead of once per scheduler. Apply it
    under ``@register_to_config``; the wrapped ``__init__`` gets only its own arguments and reads the process
    keys from ``self.config``.
    """

    def decorate(init):
        own = inspect.signature(init)
        self_parameter, *own_parameters = own.parameters.values()
        shared = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
                  for name, default in defaults.items() if name not in own.parameters]
        signature = own.replace(parameters=[self_parameter, *shared, *own_parameters])

        @functools.wraps(init)
        def init_with_process_keys(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            init(self, **{name: value for name, value in bound.arguments.items()
                          if name in own.parameters and name != self_parameter.name})

        init_with_process_keys.__signature__ = signature
        return init_with_process_keys

    return decorate
