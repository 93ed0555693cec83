"""MeanFlow sampling (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", Alg. 2; Su part 30).

A MeanFlow network predicts the average velocity u(z_t, r, t) of the flow path between times r < t, so one
evaluation jumps the whole way, z_r = z_t − (t − r) u(z_t, r, t) (eq. 5): one step from t = 1 to r = 0 is
one-step generation, and a grid 1 = t_0 > t_1 > … > t_n = 0 spends n evaluations on shorter, easier jumps.

In σ-space (x = z / (1 − t), σ = t / (1 − t)) the jump is Euler's step with the denoiser the flow process decodes
from u, D = z_t − t u: x_{σ'} = D + (σ'/σ)(x − D) is z_r = (r/t) z_t + (1 − r/t) D. So the solver is Euler's; what
makes it MeanFlow is the network's second time input, the interval t − r to the next level, which ``model_inputs``
hands the pipeline for each evaluation (``MeanFlowUNet2DModel``'s ``interval``). Such a model records
``mean_flow_objective`` in its scheduler config, which this sampler requires; at interval 0 the same network is a
flow model, so the ODE and SDE samplers drive it as well.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)

from .processes import FlowProcess, takes_process_config
from .registry import register
from .sigma_base import SIGMA_SPACE_DEFAULTS, SigmaSpaceScheduler

MEAN_FLOW_OBJECTIVES = ("mean-flow",)  # the objectives that train an average velocity (``train.objectives``)


@register("mean-flow", family="mean-flow", stochastic=False, processes=("flow",), requires=("mean_flow_objective",),
          opening_steps=1,
          description="MeanFlow (Geng et al. 2025): jump z_r = z_t − (t − r) u(z_t, r, t) with the average "
                      "velocity; 1 step = 1 evaluation; MeanFlow models only")
class MeanFlowScheduler(SigmaSpaceScheduler):
    """MeanFlow's one- and few-step map: n levels uniform in t from σ_max's t, then 0 (``default_grid``).

    ``set_timesteps(n)`` makes n jumps through n + 1 levels ending at 0 (``final_sigma="zero"``); chosen levels
    come as ``set_timesteps(sigmas=…)`` or ``timesteps=``. ``model_inputs(timestep)`` is the network's extra
    input at an evaluation point: ``{"interval": timestep − the next level's timestep}``.
    """

    @register_to_config
    @takes_process_config({**FlowProcess.config_defaults, **SIGMA_SPACE_DEFAULTS, "sigma_schedule": "flow"})
    def __init__(self, mean_flow_objective: str | None = None):
        if mean_flow_objective is not None and mean_flow_objective not in MEAN_FLOW_OBJECTIVES:
            raise ValueError(f"mean_flow_objective must be one of {MEAN_FLOW_OBJECTIVES} or None, "
                             f"got {mean_flow_objective!r}")
        self._init_sigma_space()

    def default_grid(self, num_inference_steps: int) -> torch.Tensor:
        """n levels t_k = t_max (1 − k/n), k = 0 … n − 1, as σ = t / (1 − t): with the final 0, n equal jumps in t
        (Alg. 2's grid from t_max, the t of σ_max, instead of 1), none spent on a last hop from σ_min."""
        t_max = self.sigma_range()[1] / (1 + self.sigma_range()[1])
        t = t_max * (1 - torch.arange(num_inference_steps, dtype=torch.float64) / num_inference_steps)
        return t / (1 - t)

    def solver(self, x, sigmas, noise, start=0):
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = yield sigma, x
            x = denoised + (sigma_next / sigma) * (x - denoised)
        return x

    def model_inputs(self, timestep) -> dict[str, torch.Tensor]:
        """The interval t − r (on the timestep's scale) from the evaluation point at ``timestep`` to the next level."""
        matches = self._matches(timestep, self.timesteps)
        if not matches:
            raise ValueError(f"timestep {float(timestep)} is not in this scheduler's timesteps")
        next_sigma = self.sigmas[matches[0] + 1]
        interval = self.timesteps[matches[0]].double().cpu() - self.process.timestep(next_sigma)
        return {"interval": interval.to(torch.float32).to(self.timesteps.device)}
