"""DDIM: the σ_t family of non-Markovian samplers for a trained DDPM (Song et al. 2021; Su part 4).

Keeping only the marginals p(x_t | x0) = N(ᾱ_t x0, β̄_t² I) fixed, the step from grid point t to the next
one t' may use any noise level σ_t ≤ β̄' (Su part 4; DDIM eq. 12):

    x' = ᾱ' x̂0 + sqrt(β̄'² − σ_t²) ε̂ + σ_t z,

which divided by ᾱ' is the σ-space ancestral step x' = x̂0 + σ_down ε̂ + σ_up z of ``ancestral.py``, with
σ_up = σ_t/ᾱ' and σ_down = sqrt(σ'² − σ_up²); the scheduler takes it in its own units (``VPScheduler.ancestral_step``).

``sigma_type="eta"``: σ_t = η β̄'/β̄ · sqrt(1 − ᾱ²/ᾱ'²), the DDIM paper's family, i.e. σ_up = η σ' sqrt(σ² − σ'²)/σ;
η = 1 is DDPM in distribution, η = 0 the deterministic DDIM ODE solver (Euler in σ = β̄/ᾱ, Su part 4).
``sigma_type="beta"``: σ_t = η sqrt(1 − ᾱ²/ᾱ'²), i.e. σ_t = β_t at η = 1, which Su reports "also works well";
clamped to β̄' (σ_up to σ') where it would exceed it (on the last step, into the data).
Both use the jump's own ᾱ, ᾱ', so any subsequence τ of the training steps works (DDIM §4.2).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)

from .analytic import analytic_last_std_cap, analytic_noise
from .ancestral import eta_noise, jump_noise, kept_noise
from .base import VPScheduler
from .clipping import CLIPPING_DEFAULTS
from .processes import SCHEDULE_DEFAULTS, takes_process_config
from .registry import register


def ddim_sigma(acp: torch.Tensor, acp_prev: torch.Tensor, eta: float, sigma_type: str) -> torch.Tensor:
    """σ_t (= ᾱ' σ_up) of a DDIM jump from ᾱ² to ᾱ'², ``sigma_type`` "eta" (Song et al. 2021 eq. 16) or "beta" (Su)."""
    if sigma_type == "eta":
        return eta_noise(acp, acp_prev, eta)
    if sigma_type == "beta":
        return torch.minimum(eta * jump_noise(acp, acp_prev), (1 - acp_prev).sqrt())
    raise ValueError(f"sigma_type must be 'eta' or 'beta', got {sigma_type!r}")


@register("analytic-ddim", family="analytic", stochastic=True, knobs={"eta": 0.0},
          requires=("eps_second_moment",),
          description="Analytic-DPM on DDIM η = 0: the x̂0 uncertainty as the only noise")
@register("analytic-ddpm", family="analytic", stochastic=True, knobs={"eta": 1.0},
          requires=("eps_second_moment",),
          description="Analytic-DPM: DDPM (η = 1) with the optimal variance (Bao et al. 2022)")
@register("ddim-beta", family="ddim", stochastic=True, knobs={"eta": 1.0}, defaults={"sigma_type": "beta"},
          description="DDIM with σ_t = β_t (Su, part 4)")
@register("ddim-eta1", family="ddim", stochastic=True, knobs={"eta": 1.0},
          description="DDIM, η = 1: DDPM's marginals on any step subsequence")
@register("ddim", family="ddim", stochastic=False, knobs={"eta": 0.0},
          description="DDIM, η = 0: deterministic, Euler on the probability-flow ODE (Song et al. 2021)")
class DDIMScheduler(VPScheduler):
    """DDIM sampler; same config keys and trajectories as ``diffusers.DDIMScheduler``, plus inversion.

    ``eps_second_moment`` (E‖ε_θ‖²/d per training timestep, from ``schedulers.analytic``) turns on
    Analytic-DPM's variance, with Bao et al.'s two guards: no noise on the last step, and the second-to-last
    step's std capped at ``analytic_clip_pixels`` 8-bit levels (``analytic_last_std_cap``; 0: no cap).
    ``eta`` here is the default for ``step(eta=None)``, so the stochastic members of the family also run inside
    pipelines that never pass η (diffusers' ``DDPMPipeline``). Unlike diffusers, which always steps to t − T/n,
    the next point is the next timestep of the grid, so ``linspace`` spacing and custom subsequences step where
    they say.
    """

    @register_to_config
    @takes_process_config({**SCHEDULE_DEFAULTS, **CLIPPING_DEFAULTS})
    def __init__(
        self,
        clip_sample: bool = True,  # diffusers' default; the registry's entries default to off (``KNOBS``)
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        eta: float = 0.0,
        sigma_type: Literal["eta", "beta"] = "eta",
        eps_second_moment: list[float] | None = None,
        analytic_clip_pixels: float = 2.0,
    ):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if analytic_clip_pixels < 0:
            raise ValueError(f"analytic_clip_pixels must be ≥ 0 (0: no cap), got {analytic_clip_pixels}")
        if eps_second_moment is not None and len(eps_second_moment) != self.config.num_train_timesteps:
            raise ValueError(f"eps_second_moment needs one value per training timestep "
                             f"({self.config.num_train_timesteps}), "
                             f"got {len(eps_second_moment)}")
        self._init_schedule()
        if not set_alpha_to_one:  # diffusers: the run ends at ᾱ_0² instead of on the data
            self._final_alpha_cumprod = float(self.alphas_cumprod[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One DDIM step x_t → x_{t'}.

        With x̂0 clipped or thresholded, ε̂ is always re-derived from the clipped x̂0 (``predict_x0_and_epsilon``):
        the step is diffusers' with ``use_clipped_model_output=True``. Diffusers' default pairs the clipped x̂0 with
        the model's ε̂, which leaves the line through x_t that both lie on; classifier-free guidance, whose x̂0 is
        clipped most, suffers most. The argument is taken for diffusers' ``DDIMPipeline``, which passes it, and
        changes nothing.
        """
        eta = self.config.eta if eta is None else eta
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        prev_t = self.step_target(timestep)
        x0, eps = self.predict_x0_and_epsilon(model_output, timestep, sample)
        acp, acp_prev = self.alpha_cumprod_at(int(timestep)), self.alpha_cumprod_at(prev_t)
        std, kept = ddim_sigma(acp, acp_prev, eta, self.config.sigma_type), None
        if self.config.eps_second_moment is not None and prev_t >= 0:  # Analytic-DPM, no noise onto the data
            kept = kept_noise(1 - acp_prev, std)  # the mean stays DDIM's
            alpha, beta = self.coefficients_at(int(timestep))
            std = analytic_noise(std, kept, acp_prev.sqrt(), beta / alpha, self.config.eps_second_moment[int(timestep)])
            if self.previous_timestep(prev_t) < 0 and self.config.analytic_clip_pixels > 0:
                std = std.clamp(max=analytic_last_std_cap(self.config.analytic_clip_pixels))
        prev_sample = self.ancestral_step(x0, eps, prev_t, std, model_output, generator, variance_noise, kept)

        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    # ---------------------------------------------------------------- inversion (x0 → x_T, η = 0)

    def inversion_timesteps(self) -> list[tuple[int, int]]:
        """The inversion run as (timestep to evaluate the model at, timestep to move to), ascending.

        Each step moves from one grid point up to the next, with ε̂ taken at the point it starts from; the
        first step starts on the data and takes ε̂ at the lowest grid timestep.
        """
        ascending = self.timesteps.flip(0).tolist()
        return [(ascending[max(k - 1, 0)], t) for k, t in enumerate(ascending)]

    def inversion_step(self, model_output: torch.Tensor, model_timestep: int, to_timestep: int,
                       sample: torch.Tensor) -> torch.Tensor:
        """The deterministic DDIM update run upwards: x_to = ᾱ_to x̂0 + β̄_to ε̂ (Song et al. 2021, §4.3), the
        ancestral step with no fresh noise."""
        x0, eps = self.predict_x0_and_epsilon(model_output, model_timestep, sample)
        return self.ancestral_step(x0, eps, int(to_timestep), 0.0, model_output)
