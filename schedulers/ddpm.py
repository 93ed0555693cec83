"""DDPM ancestral sampling (Ho et al. 2020; Su, "生成扩散模型漫谈" parts 1–3).

With ᾱ, β̄ at the current grid point, ᾱ', β̄' at the next one, and the jump's α_t = ᾱ/ᾱ', β_t² = 1 − α_t²,
the posterior of Su part 3 is

    p(x' | x_t, x0) = N( (ᾱ' β_t²/β̄²) x0 + (α_t β̄'²/β̄²) x_t ,  (β̄'² β_t²/β̄²) I ),

and DDPM samples it with x0 replaced by the model's x̂0. The variance is either that posterior
variance (``fixed_small``, exact when the data is a single point) or β_t² (``fixed_large``, exact when
the data is N(0, I)); Su part 2 derives both.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)
from diffusers.utils.torch_utils import randn_tensor

from .base import VPScheduler
from .processes import SCHEDULE_DEFAULTS, takes_process_config
from .registry import register

VARIANCE_TYPES = ("fixed_small", "fixed_large")


def ddpm_posterior(acp: torch.Tensor, acp_prev: torch.Tensor):
    """Coefficients (on x̂0, on x_t) of the posterior mean and its variance, from ᾱ² and ᾱ'² (Su part 3)."""
    alpha_sq = acp / acp_prev  # α_t² of the jump
    beta_sq = 1 - alpha_sq  # β_t²
    return acp_prev.sqrt() * beta_sq / (1 - acp), alpha_sq.sqrt() * (1 - acp_prev) / (1 - acp), beta_sq


@register("ddpm-large", family="ancestral", stochastic=True, defaults={"variance_type": "fixed_large"},
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
    @takes_process_config(SCHEDULE_DEFAULTS)
    def __init__(
        self,
        variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small",
        clip_sample: bool = True,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
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
        prev_t = self.previous_timestep(timestep)
        acp, acp_prev = self.alpha_cumprod_at(int(timestep)), self.alpha_cumprod_at(prev_t)
        x0, _ = self.predict_x0_and_epsilon(model_output, timestep, sample)

        c_x0, c_xt, beta_sq = ddpm_posterior(acp, acp_prev)
        prev_sample = c_x0.to(sample.dtype) * x0 + c_xt.to(sample.dtype) * sample
        if prev_t >= 0:
            if self.config.variance_type == "fixed_small":
                variance = ((1 - acp_prev) / (1 - acp) * beta_sq).clamp(min=1e-20)
            else:
                variance = beta_sq
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            prev_sample = prev_sample + variance.sqrt().to(sample.dtype) * noise

        if not return_dict:
            return prev_sample, x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
