"""What every discrete-time VP scheduler shares: the training schedule, the inference grid, decoding outputs,
and the diffusers adapter over the σ-space ancestral step (``ancestral.py``).

Subclasses are diffusers schedulers (``SchedulerMixin`` + ``ConfigMixin``): they declare their config with
``@register_to_config`` and call ``self._init_schedule()``; their ``step`` picks the step's noise, the few lines
of their paper, and hands it to ``ancestral_step``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .ancestral import ancestral_step
from .clipping import check_clipping, clip_x0, clips
from .process import (
    VPSchedule,
    coefficients_of,
    expand_to,
    spaced_timesteps,
    target_from_x0_and_epsilon,
    to_x0_and_epsilon,
)


class VPScheduler(SchedulerMixin, ConfigMixin):
    """Base of the schedulers that walk a discrete VP process (DDPM's ``alphas_cumprod`` table) backwards.

    Each step is the σ-space ancestral step on x_ve = x_t/ᾱ_t = x0 + σ_t ε multiplied by ᾱ': the sample stays in
    the model's own space (x_t = ᾱ_t x0 + β̄_t ε), so ``scale_model_input`` is the identity and ``init_noise_sigma``
    is 1: the scheduler drops into diffusers' ``DDPMPipeline`` unchanged, with integer timesteps.
    """

    order = 1
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]  # as diffusers' DDPM and DDIM list them
    # final ᾱ² after the last step: 1 means the last step lands on clean data.
    _final_alpha_cumprod = 1.0

    def _init_schedule(self):
        if self.config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr is not supported: σ = ∞ at the last step has no σ-space image")
        check_clipping(self.config)
        self.schedule = VPSchedule.from_config(self.config)
        self.betas = self.schedule.betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._use_grid(torch.arange(self.config.num_train_timesteps - 1, -1, -1))  # diffusers' DDPM: the training grid

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---------------------------------------------------------------- the inference grid

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ):
        """Choose the descending timesteps of a sampling run: ``num_inference_steps`` spaced by
        ``config.timestep_spacing``, or any strictly descending subsequence given as ``timesteps``
        (DDIM's "any subsequence τ", Song et al. 2021 §4.2)."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            steps = torch.as_tensor(np.asarray(timesteps), dtype=torch.int64)
            if steps.ndim != 1 or len(steps) == 0:
                raise ValueError("timesteps must be a non-empty 1-D list of integers")
            if torch.any(steps[1:] >= steps[:-1]):
                raise ValueError("timesteps must be strictly descending")
            if steps[0] >= T or steps[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {T - 1}]")
            self.custom_timesteps = True
        else:
            steps = spaced_timesteps(T, int(num_inference_steps), self.config.timestep_spacing,
                                     self.config.get("steps_offset", 0))
            self.custom_timesteps = False
        self.num_inference_steps = len(steps)
        self._use_grid(steps, device)

    def _use_grid(self, steps: torch.Tensor, device=None):
        self.timesteps = steps.to(device)
        self._index_of = {int(t): i for i, t in enumerate(steps.tolist())}
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        """The grid index after the last ``step`` (None before the first); ``step`` itself reads its timestep."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The grid index an img2img run starts from (``set_begin_index``); informational, as ``step`` honours the
        timestep it is given."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        if not 0 <= int(begin_index) < len(self.timesteps):
            raise ValueError(f"begin_index must be in [0, {len(self.timesteps) - 1}], got {begin_index}")
        self._begin_index = int(begin_index)

    def step_target(self, timestep) -> int:
        """The timestep a ``step`` at ``timestep`` lands on (``previous_timestep``), recorded as ``step_index``."""
        self._step_index = self.index_for_timestep(timestep) + 1
        return self.previous_timestep(timestep)

    def index_for_timestep(self, timestep) -> int:
        """Position of ``timestep`` in the current grid (the training grid T − 1 … 0 before ``set_timesteps``)."""
        t = int(timestep)
        if t not in self._index_of:
            raise ValueError(f"timestep {t} is not in this scheduler's grid {self.timesteps.tolist()}")
        return self._index_of[t]

    def previous_timestep(self, timestep) -> int:
        """The next timestep of the run (the "previous" one in diffusion time); −1 when it is the data."""
        i = self.index_for_timestep(timestep)
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def alpha_cumprod_at(self, timestep: int) -> torch.Tensor:
        """ᾱ² of a grid point, float64; −1 stands for the end of the run (1, or ᾱ_0² without ``set_alpha_to_one``)."""
        if timestep < 0:
            return torch.tensor(self._final_alpha_cumprod, dtype=torch.float64)
        return self.schedule.alpha_cumprod(int(timestep))

    def coefficients_at(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ, β̄) of a grid point, float64; −1 stands for the end of the run."""
        return coefficients_of(self.alpha_cumprod_at(timestep))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # ---------------------------------------------------------------- decoding model outputs

    def predict_x0_and_epsilon(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor):
        """(x̂0, ε̂) implied by the model output at ``timestep``, x̂0 clipped or thresholded as configured
        (``clipping.clip_x0``) and then ε̂ = (x_t − ᾱ x̂0)/β̄ re-derived from it (``epsilon_of``), so that the
        step stays on the line through x_t that both lie on; without clipping, the model's own (x̂0, ε̂)."""
        alpha, beta = self.coefficients_at(int(timestep))
        x0, eps = to_x0_and_epsilon(self.config.prediction_type, model_output, sample, alpha, beta)
        if not clips(self.config):
            return x0, eps
        x0 = clip_x0(x0, self.config)
        return x0, self.epsilon_of(x0, timestep, sample)

    def epsilon_of(self, x0: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x_t − ᾱ x̂0)/β̄: the noise consistent with a (clipped) x̂0 at ``timestep``."""
        alpha, beta = self.coefficients_at(int(timestep))
        return to_x0_and_epsilon("sample", x0, sample, alpha, beta)[1]

    def ancestral_step(self, x0: torch.Tensor, eps: torch.Tensor, prev_timestep: int, noise_std,
                       model_output: torch.Tensor, generator=None, variance_noise=None, kept_std=None) -> torch.Tensor:
        """The ancestral step onto the grid point ``prev_timestep`` in the model's own space,
        x' = ᾱ' x̂0 + sqrt(β̄'² − σ_t²) ε̂ + σ_t z (``ancestral.ancestral_step``; σ_t = ``noise_std``). Noise
        (``variance_noise``, or drawn like ``model_output``) only where σ_t > 0."""
        noise = None
        if noise_std > 0:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        acp_next = self.alpha_cumprod_at(prev_timestep)
        return ancestral_step(x0, eps, acp_next.sqrt(), 1 - acp_next, torch.as_tensor(noise_std, dtype=torch.float64),
                              noise, kept_std)

    # ---------------------------------------------------------------- training-time helpers (diffusers API)

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor):
        alpha, beta = self.schedule.coefficients(timesteps.cpu())
        return expand_to(alpha.to(like.device), like), expand_to(beta.to(like.device), like)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """x_t = ᾱ_t x0 + β̄_t ε (Su part 1; DDPM eq. 4)."""
        alpha, beta = self._coefficients(timesteps, original_samples)
        return alpha * original_samples + beta * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The v-prediction target ᾱ_t ε − β̄_t x0 (Salimans & Ho 2022)."""
        alpha, beta = self._coefficients(timesteps, sample)
        return target_from_x0_and_epsilon("v_prediction", sample, noise, alpha, beta)

