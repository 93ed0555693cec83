"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1; Su part 28).

A consistency model f_θ(x, σ) maps any point of a probability-flow ODE trajectory to the trajectory's origin, so
one evaluation at σ_max generates. More steps trade evaluations for quality: denoise, re-noise to a lower
intermediate σ, denoise again,

    x ← f_θ(x, σ_k),   x ← x + σ_{k+1} z   (z ~ N(0, I)),   k = 0 … n − 1,

ending on f_θ at the last intermediate σ. In σ-space the model's denoiser D(x; σ) is f_θ, with the exact
boundary f_θ(x, 0) = x, so the re-noising adds σ_{k+1} z (the paper's sqrt(τ² − ε²) with ε = 0).

Such a model records ``consistency_objective`` (the objective that trained it as a consistency function) in its
scheduler config: the sampler requires it, since on an ordinary diffusion model, whose D is a posterior mean,
the same loop returns blurred means, not samples.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)

from .processes import GAUSSIAN_SIGMA_PROCESSES, VPProcess, takes_process_config
from .registry import register
from .sigma_base import SIGMA_SPACE_DEFAULTS, SigmaSpaceScheduler

# The objectives that train a model as a consistency function (``train.objectives``), recorded in its config.
CONSISTENCY_OBJECTIVES = ("consistency-distillation", "consistency-training")


@register("consistency", family="consistency", stochastic=True, processes=GAUSSIAN_SIGMA_PROCESSES,
          requires=("consistency_objective",), opening_steps=2,
          description="multistep consistency sampling (Song et al. 2023, Alg. 1): denoise, re-noise to the next "
                      "intermediate σ; 1 step = 1 evaluation; consistency models only")
class ConsistencyScheduler(SigmaSpaceScheduler):
    """Multistep consistency sampling over chosen intermediate noise levels.

    ``set_timesteps(n)`` evaluates at the first n points of the (n + 1)-point ``sigma_schedule`` grid from σ_max
    to σ_min (default: uniform in t for a flow model, Karras's for vp and edm): one step is σ_max alone, two add
    the grid's midpoint, and the last step lands on f_θ. Other intermediate times come as
    ``set_timesteps(sigmas=[σ_max, …])`` or ``timesteps=``; ValueError for a σ above the σ_max the model was
    trained to (``sigma_range``).
    """

    @register_to_config
    @takes_process_config({**VPProcess.config_defaults, **SIGMA_SPACE_DEFAULTS})
    def __init__(self, consistency_objective: str | None = None, sigma_schedule: str | None = None):
        if sigma_schedule is None:  # the process's natural grid: uniform in t for a flow model, else Karras's
            self.register_to_config(sigma_schedule="flow" if self.config.model_process == "flow" else "karras")
        if consistency_objective is not None and consistency_objective not in CONSISTENCY_OBJECTIVES:
            raise ValueError(f"consistency_objective must be one of {CONSISTENCY_OBJECTIVES} or None, "
                             f"got {consistency_objective!r}")
        self._init_sigma_space()

    def default_grid(self, num_inference_steps: int) -> torch.Tensor:
        return super().default_grid(num_inference_steps + 1)[:-1]

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas)
        high = self.sigma_range()[1]
        if float(self.sigmas[0]) > high * (1 + 1e-9):
            raise ValueError(f"the first intermediate σ {float(self.sigmas[0]):g} is above the σ_max {high:g} the "
                             "model was trained to: choose intermediate times within its range")

    def solver(self, x, sigmas, noise, start=0):
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = yield sigma, x
            x = denoised if sigma_next == 0 else denoised + sigma_next * noise(x)
        return x
