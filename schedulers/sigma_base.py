"""The diffusers adapter for σ-space solvers written as plain loops.

A solver is a generator in the style of k-diffusion's ``sampling.py``: it walks a σ grid and, whenever it
needs the denoiser, ``yield``s the point (σ, x) and receives D(x; σ) — the posterior mean of x0 — back:

    def euler(x, sigmas, noise):
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = yield sigma, x
            x = x + (sigma_next - sigma) * (x - denoised) / sigma
        return x

``SigmaSpaceScheduler`` turns such a loop into diffusers' one-model-call-per-``step()`` protocol. Because a
fixed-step solver asks for the same σ's whatever the model says, ``set_timesteps`` traces the loop once with
a zero denoiser to list the evaluation points; ``timesteps`` are the model's (fractional) training timesteps
at those σ's, so multi-evaluation solvers need no doubled-timestep bookkeeping. The pipeline's sample is
x_ve = x0 + σ ε (``init_noise_sigma`` = sqrt(1 + σ_max²)). The model may have been trained on another process
(config ``model_process``: ``vp``, ``flow`` or ``edm``): its ``SigmaProcess`` (``processes/``) gives the network's
input scale (``scale_model_input``) and time (``timesteps``), and decodes its output into D (``step``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput as SchedulerOutput  # prev_sample + x̂0
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .process import VPSchedule
from .processes import GAUSSIAN_SIGMA_PROCESSES, sigma_process
from .sigmas import make_sigmas

FINAL_SIGMAS = ("zero", "sigma_min")
# The σ grid's config keys, which every σ-space scheduler takes and ``set_timesteps`` reads; a scheduler that wants
# another default declares the key itself (the SDEs' grid is uniform in t, rk45's geometric).
SIGMA_GRID_DEFAULTS = {"sigma_schedule": "karras", "rho": 7.0, "sigma_min": None, "sigma_max": None,
                       "final_sigma": "zero"}


class SigmaSpaceScheduler(SchedulerMixin, ConfigMixin):
    """Base of the σ-space samplers; subclasses define ``solver(x, sigmas, noise)`` as a generator."""

    order = 1
    supported_processes = GAUSSIAN_SIGMA_PROCESSES  # the registry's default ``processes`` for these samplers

    def _init_sigma_space(self):
        if self.config.final_sigma not in FINAL_SIGMAS:
            raise ValueError(f"final_sigma must be one of {FINAL_SIGMAS}, got {self.config.final_sigma!r}")
        self.schedule = VPSchedule.from_config(self.config)
        self.process = sigma_process(self.config)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.zeros(0)
        self._run = None
        self._step_index = 0
        self._generator = None

    def solver(self, x, sigmas, noise):
        raise NotImplementedError

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---------------------------------------------------------------- the grid and its evaluation points

    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max): the config's, or the range the model was trained on."""
        low, high = self.process.sigma_range()
        return self.config.sigma_min or low, self.config.sigma_max or high

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None):
        """Lay out ``num_inference_steps`` grid points (or take ``sigmas``, descending) and trace the solver."""
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("pass exactly one of num_inference_steps or sigmas")
        if sigmas is None:
            if num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")
            low, high = self.sigma_range()
            grid = make_sigmas(self.config.sigma_schedule, num_inference_steps, self.schedule, low, high,
                               self.config.rho)
        else:
            grid = torch.as_tensor(sigmas, dtype=torch.float64)
            if grid.ndim != 1 or torch.any(grid[1:] >= grid[:-1]) or grid[-1] <= 0:
                raise ValueError("sigmas must be a strictly descending list of positive noise levels")
        if self.config.final_sigma == "zero":
            grid = torch.cat([grid, grid.new_zeros(1)])
        self.sigmas = grid
        self.num_inference_steps = len(grid) - 1
        self.evaluation_sigmas = self._trace(grid)
        self.timesteps = self.process.timestep(self.evaluation_sigmas).to(torch.float32).to(device)
        self.init_noise_sigma = float((1 + grid[0] ** 2).sqrt())
        self._run = None
        self._step_index = 0

    def _trace(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The σ's the solver will ask for: run it once with a zero denoiser and zero noise."""
        zero = torch.zeros(1, 1, dtype=torch.float64)
        run, asked = self.solver(zero, sigmas, torch.zeros_like), []
        try:
            sigma, _ = next(run)
            while True:
                asked.append(float(sigma))
                sigma, _ = run.send(zero)
        except StopIteration:
            pass
        return torch.tensor(asked, dtype=torch.float64)

    @property
    def nfe(self) -> int:
        """Network evaluations a run of the current grid costs (per image, without guidance)."""
        return len(self.timesteps)

    # ---------------------------------------------------------------- the diffusers protocol

    def _current_sigma(self) -> torch.Tensor:
        if self._step_index >= len(self.evaluation_sigmas):
            raise ValueError("step() called more often than set_timesteps() planned; call set_timesteps again")
        return self.evaluation_sigmas[self._step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's input s(σ) x_ve at the current σ (ᾱ x_ve for a VP model)."""
        return sample * self.process.input_scale(self._current_sigma()).to(sample.dtype)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return randn_tensor(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """Feed the denoiser's answer at the current evaluation point to the solver; get its next point."""
        denoised = self.process.denoised(model_output, sample, self._current_sigma())
        self._generator = generator
        if self._run is None:
            self._run = self.solver(sample, self.sigmas, self._noise)
            next(self._run)
        try:
            _, prev_sample = self._run.send(denoised)
        except StopIteration as finished:
            prev_sample, self._run = finished.value, None
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
