"""DDPM ancestral sampling (Ho et al. 2020; Su, "生成扩散模型漫谈" parts 1–3) as a σ-space ancestral step.

With ᾱ, β̄ at the current grid point, ᾱ', β̄' at the next one, and the jump's α_t = ᾱ/ᾱ', β_t² = 1 − α_t²,
the posterior of Su part 3 is

    p(x' | x_t, x0) = N( (ᾱ' β_t²/β̄²) x0 + (α_t β̄'²/β̄²) x_t ,  (β̄'² β_t²/β̄²) I ),

and DDPM samples it with x0 replaced by the model's x̂0. Divided by ᾱ', it is the ancestral step
x' = x̂0 + σ_down ε̂ + σ_up z of ``ancestral.py`` with DDIM η = 1's split of σ' (``fixed_small``, exact when the
data is a single point). ``fixed_large`` keeps that mean and adds the jump's own β_t as noise, σ_up = β_t/ᾱ'
(exact when the data is N(0, I)); Su part 2 derives both.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)

from .ancestral import eta_noise, jump_noise, kept_noise
from .base import VPScheduler
from .clipping import CLIPPING_DEFAULTS
from .processes import SCHEDULE_DEFAULTS, takes_process_config
from .registry import register

VARIANCE_TYPES = ("fixed_small", "fixed_large")


def ddpm_noise(acp: torch.Tensor, acp_prev: torch.Tensor, variance_type: str):
    """(kept std or None for the marginal-keeping split, noise std σ_t) of a DDPM step from ᾱ² to ᾱ'²: the
    posterior's (DDIM η = 1), or for ``fixed_large`` β_t on top of the posterior mean (none onto the data)."""
    small = eta_noise(acp, acp_prev, 1.0)
    if variance_type == "fixed_small":
        return None, small
    large = jump_noise(acp, acp_prev) if acp_prev < 1 else torch.zeros((), dtype=torch.float64)
    return kept_noise(1 - acp_prev, small), large


@register("ddpm-large", family="ancestral", stochastic=True, defaults={"variance_type": "fixed_large"}, min_nfe=8,
          description="DDPM ancestral sampler, variance β_t (Ho et al. 2020)")
@register("ddpm", family="ancestral", stochastic=True,
          description="DDPM ancestral sampler, posterior variance β̃ (Ho et al. 2020)")
class DDPMScheduler(VPScheduler):
    """Ancestral DDPM sampler; same config keys and trajectories as ``diffusers.DDPMScheduler``.

    Differences from diffusers, on purpose: no noise is added on the final step into clean data (diffusers
    adds β_t-sized noise there with ``fixed_large`` and a spacing whose last timestep is not 0), and the
    coefficients are computed in float64.
    """

    @register_to_config
    @takes_process_config({**SCHEDULE_DEFAULTS, **CLIPPING_DEFAULTS})
    def __init__(
        self,
        variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small",
        clip_sample: bool = True,  # diffusers' default; the registry's entries default to off (``KNOBS``)
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        self._init_schedule()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One ancestral step x_t → x_{t'} (t' the next grid point)."""
        prev_t = self.step_target(timestep)
        x0, _ = self.predict_x0_and_epsilon(model_output, timestep, sample)
        eps = self.epsilon_of(x0, timestep, sample)  # the posterior mean is in x̂0 and x_t, as diffusers': ε̂ from x̂0
        kept, std = ddpm_noise(self.alpha_cumprod_at(int(timestep)), self.alpha_cumprod_at(prev_t),
                               self.config.variance_type)
        prev_sample = self.ancestral_step(x0, eps, prev_t, std, model_output, generator, kept_std=kept)

        if not return_dict:
            return prev_sample, x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
