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
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .clipping import CLIPPING_DEFAULTS, check_clipping, clip_x0
from .process import VPSchedule
from .processes import GAUSSIAN_SIGMA_PROCESSES, sigma_process
from .sigmas import make_sigmas

FINAL_SIGMAS = ("zero", "sigma_min")
# The σ grid's config keys, which every σ-space scheduler takes and ``set_timesteps`` reads; a scheduler that wants
# another default declares the key itself (the SDEs' grid is uniform in t, rk45's geometric).
SIGMA_GRID_DEFAULTS = {"sigma_schedule": "karras", "rho": 7.0, "sigma_min": None, "sigma_max": None,
                       "final_sigma": "zero", "tuned_sigmas": None}
# ``tuned_sigmas``: a grid tuned for one model and one step count (``schedulers.tuning``); it replaces the schedule,
# and ``set_timesteps`` then takes only that step count.
# Every σ-space scheduler's own config keys: its grid, and the clipping of D (``clipping.py``, diffusers' keys).
SIGMA_SPACE_DEFAULTS = {**SIGMA_GRID_DEFAULTS, **CLIPPING_DEFAULTS}


class SigmaSpaceScheduler(SchedulerMixin, ConfigMixin):
    """Base of the σ-space samplers; subclasses define ``solver(x, sigmas, noise)`` as a generator.

    Like diffusers' ``EulerDiscreteScheduler`` it has a grid right after construction (``num_train_timesteps``
    steps), ``step_index`` / ``begin_index`` / ``set_begin_index`` / ``index_for_timestep``, and ``add_noise``
    into its own state x_ve = x0 + σ ε. ``step`` honours the timestep it is given: an evaluation point where a
    run of the solver can start (the first evaluation of a grid step) starts a fresh run there from the sample,
    so img2img and SDEdit can begin anywhere on the grid; multistep solvers start that run without history, as
    diffusers' do.
    """

    order = 1
    # diffusers' VP schedulers, as its Euler lists them, but EDMEuler: its ``sigma_schedule`` key means another thing
    _compatibles = [e.name for e in KarrasDiffusionSchedulers if e.name != "EDMEulerScheduler"]
    supported_processes = GAUSSIAN_SIGMA_PROCESSES  # the registry's default ``processes`` for these samplers

    def _init_sigma_space(self):
        if self.config.final_sigma not in FINAL_SIGMAS:
            raise ValueError(f"final_sigma must be one of {FINAL_SIGMAS}, got {self.config.final_sigma!r}")
        self.schedule = VPSchedule.from_config(self.config)
        self.betas = self.schedule.betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = self.schedule.alphas_cumprod
        check_clipping(self.config)
        if self.config.tuned_sigmas is not None:
            self._checked_sigmas(self.config.tuned_sigmas)
        self.process = sigma_process(self.config)
        self._generator = None
        self.order = self._evaluations_per_step()
        self.set_timesteps(self.default_inference_steps())

    def solver(self, x, sigmas, noise, start=0):
        """The solver's generator over ``sigmas``, which begin at grid index ``start`` of the scheduler's grid (a run
        started mid-grid: a multistep solver starts without its warm-up, a fitted table from its entry ``start``)."""
        raise NotImplementedError

    def default_inference_steps(self) -> int:
        """The grid laid out at construction, before any ``set_timesteps``: a tuned grid's steps, else the training
        steps (as diffusers' Euler)."""
        if self.config.tuned_sigmas is not None:
            return len(self._tuned_grid()) - 1
        return self.config.num_train_timesteps

    def _tuned_grid(self) -> torch.Tensor:
        grid = self._checked_sigmas(self.config.tuned_sigmas)
        if grid[-1] > 0 and self.config.final_sigma == "zero":
            grid = torch.cat([grid, grid.new_zeros(1)])
        return grid

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---------------------------------------------------------------- the grid and its evaluation points

    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max): the config's, or the range the model was trained on."""
        low, high = self.process.sigma_range()
        return self.config.sigma_min or low, self.config.sigma_max or high

    def default_grid(self, num_inference_steps: int) -> torch.Tensor:
        """The σ grid of a run of ``num_inference_steps``, before the final σ: that many points of
        ``config.sigma_schedule`` over ``sigma_range``."""
        low, high = self.sigma_range()
        return make_sigmas(self.config.sigma_schedule, num_inference_steps, self.schedule, low, high, self.config.rho)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """Lay out the σ grid and trace the solver over it: ``num_inference_steps`` points of
        ``config.sigma_schedule`` (or, with a ``tuned_sigmas`` config, that grid, whose step count it must be), or
        ``sigmas`` (strictly descending; a final 0 is kept, else the config's
        ``final_sigma`` decides), or ``timesteps``, the model's time inputs at the grid points (diffusers'
        Euler's meaning; repeated entries count once). The scheduler's own ``sigmas`` and ``timesteps`` give back
        its grid."""
        if sum(arg is not None for arg in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        if num_inference_steps is not None:
            if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be an integer ≥ 1, got {num_inference_steps}")
            if self.config.tuned_sigmas is not None:
                grid = self._tuned_grid()
                if num_inference_steps != len(grid) - 1:
                    raise ValueError(f"this scheduler's σ grid was tuned for {len(grid) - 1} steps, not "
                                     f"{num_inference_steps}: run {len(grid) - 1} steps, or tune it again for "
                                     f"{num_inference_steps} (schedulers.tuning.tune_sampler)")
            else:
                grid = self.default_grid(int(num_inference_steps))
        elif sigmas is not None:
            grid = self._checked_sigmas(sigmas)
        else:
            grid = self._grid_of_timesteps(timesteps)
        if grid[-1] > 0 and self.config.final_sigma == "zero":
            grid = torch.cat([grid, grid.new_zeros(1)])
        self.sigmas = grid
        self.num_inference_steps = len(grid) - 1
        self.evaluation_sigmas = self._trace(grid)
        self.timesteps = self.process.timestep(self.evaluation_sigmas).to(torch.float32).to(device)
        self.init_noise_sigma = float((1 + grid[0] ** 2).sqrt())
        self._reset_run()

    def _reset_run(self):
        """A new grid: no run in progress, no step taken, no begin index."""
        self._run = None
        self._run_index = None
        self._step_index = None
        self._begin_index = None
        self._starts = {0: 0}  # evaluation index → grid index, for the evaluation points a run can start from

    @staticmethod
    def _checked_sigmas(sigmas) -> torch.Tensor:
        grid = torch.as_tensor(sigmas.cpu() if torch.is_tensor(sigmas) else sigmas, dtype=torch.float64)
        if (grid.ndim != 1 or len(grid) == 0 or not torch.all(torch.isfinite(grid)) or torch.any(grid[1:] >= grid[:-1])
                or grid[-1] < 0 or (len(grid) == 1 and grid[0] == 0)):
            raise ValueError("sigmas must be a strictly descending 1-D list of positive noise levels, optionally "
                             f"ending in 0; got {grid.tolist() if grid.ndim == 1 else grid}")
        return grid

    def _grid_of_timesteps(self, timesteps) -> torch.Tensor:
        given = torch.as_tensor(timesteps.cpu() if torch.is_tensor(timesteps) else timesteps, dtype=torch.float32)
        if getattr(self, "timesteps", None) is not None and given.shape == self.timesteps.shape and torch.equal(
                given, self.timesteps.cpu()):
            return self.sigmas  # its own evaluation points: the grid they came from
        if given.ndim != 1 or len(given) == 0 or torch.any(given[1:] > given[:-1]):
            raise ValueError(f"timesteps must be a non-empty descending 1-D list, got {given.tolist()}")
        grid = self.process.sigma_of_timestep(torch.unique_consecutive(given).double())
        if not torch.all(torch.isfinite(grid)) or torch.any(grid <= 0):
            raise ValueError(f"timesteps {given.tolist()} lie outside the model's time range (σ must be finite, > 0)")
        return self._checked_sigmas(grid)

    def _trace(self, sigmas: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The σ's the solver will ask for: run it once with a zero denoiser and zero noise."""
        zero = torch.zeros(1, 1, dtype=torch.float64)
        run, asked = self.solver(zero, sigmas, torch.zeros_like, start), []
        try:
            sigma, _ = next(run)
            while True:
                asked.append(float(sigma))
                sigma, _ = run.send(zero)
        except StopIteration:
            pass
        return torch.tensor(asked, dtype=torch.float64)

    def _evaluations_per_step(self) -> int:
        """``order``: the evaluations of one grid step away from the ends (Heun's 2, 3M's 1), the stride with which
        diffusers' img2img pipelines slice ``timesteps`` (``t_start * order``)."""
        grid = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
        try:
            return max(1, len(self._trace(grid[1:], 1)) - len(self._trace(grid[2:], 2)))
        except ValueError:  # a solver bound to one grid (a fitted table per step) has no steady step to count
            return 1

    @property
    def nfe(self) -> int:
        """Network evaluations a run of the current grid costs (per image, without guidance)."""
        return len(self.timesteps)

    # ---------------------------------------------------------------- step index (diffusers' Euler)

    @property
    def step_index(self) -> int | None:
        """The evaluation point the next ``step`` answers; None before the first ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The evaluation point the first ``step`` answers, set by ``set_begin_index`` (img2img pipelines)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the run at evaluation point ``begin_index`` (entries of ``timesteps``, as diffusers' Heun counts)."""
        self._start_grid_index(int(begin_index))
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """The first evaluation point at ``timestep`` from which a run can start (Heun's timesteps repeat: the
        second entry of a pair starts a grid step, as in diffusers). ValueError for a timestep off the grid."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        matches = self._matches(timestep, schedule)
        if not matches:
            raise ValueError(f"timestep {float(timestep)} is not in this scheduler's timesteps")
        for index in matches:
            if self._start_grid_index(index, strict=False) is not None:
                return index
        raise ValueError(f"timestep {float(timestep)} is not where a {self.config.get('solver', 'solver')} run can "
                         "start: it is inside a grid step; start at a grid step's first evaluation, or call "
                         "set_timesteps(sigmas=…) with the remaining grid")

    @staticmethod
    def _matches(timestep, schedule) -> list[int]:
        t = torch.as_tensor(timestep.cpu() if torch.is_tensor(timestep) else timestep, dtype=torch.float32)
        if t.numel() != 1:
            raise ValueError(f"step takes one timestep, got {t.numel()}")
        return (schedule.cpu().to(torch.float32) == t.reshape(())).nonzero().flatten().tolist()

    def _start_grid_index(self, index: int, strict: bool = True) -> int | None:
        """The grid index k whose fresh run over ``sigmas[k:]`` asks for exactly evaluation points ``index`` on."""
        if index not in self._starts:
            start = None
            if 0 <= index < len(self.evaluation_sigmas):
                tail = self.evaluation_sigmas[index:]
                for k in (self.sigmas == tail[0]).nonzero().flatten().tolist():
                    try:
                        if torch.equal(self._trace(self.sigmas[k:], k), tail):
                            start = k
                            break
                    except ValueError:
                        pass
            self._starts[index] = start
        if strict and self._starts[index] is None:
            raise ValueError(f"evaluation point {index} of {len(self.evaluation_sigmas)} is not where a run can start "
                             "(out of range, or inside a grid step)")
        return self._starts[index]

    def _index_of_step(self, timestep) -> int:
        """The evaluation point a ``step`` at ``timestep`` answers: the next one of the current run when the timestep
        is its, the begin index on the first step, otherwise where ``timestep`` sits on the grid."""
        if self._step_index is None and self._begin_index is not None:
            index = self._begin_index
        else:
            index = self._step_index
        if index is not None and index < len(self.timesteps) and index in self._matches(timestep, self.timesteps):
            return index
        if self._step_index is None and self._begin_index is not None:
            raise ValueError(f"timestep {float(timestep)} is not timesteps[begin_index = {self._begin_index}] = "
                             f"{float(self.timesteps[self._begin_index])}")
        return self.index_for_timestep(timestep)

    # ---------------------------------------------------------------- the diffusers protocol

    def _sigma_of_timesteps(self, timesteps) -> torch.Tensor:
        """σ at each time input: the grid's exact σ where it is on the grid, else the process's inverse time map."""
        t = torch.as_tensor(timesteps.cpu() if torch.is_tensor(timesteps) else timesteps).reshape(-1)
        sigma = self.process.sigma_of_timestep(t.double())
        for i, value in enumerate(t.tolist()):
            matches = self._matches(value, self.timesteps)
            if matches:
                sigma[i] = self.evaluation_sigmas[matches[0]]
        if not torch.all(torch.isfinite(sigma)) or torch.any(sigma < 0):
            raise ValueError(f"timesteps {t.tolist()} lie outside the model's time range")
        return sigma

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's input s(σ) x_ve at ``timestep``'s σ (ᾱ x_ve for a VP model); without a timestep, at the
        evaluation point the next ``step`` answers."""
        if timestep is None:
            sigma = self.evaluation_sigmas[self._step_index or self._begin_index or 0]
        else:
            sigma = self._sigma_of_timesteps(timestep)[0]
        return sample * self.process.input_scale(sigma).to(sample.dtype)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return randn_tensor(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def denoised(self, model_output: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; σ) from the network's output at the state ``sample``, clipped or thresholded as configured
        (``clipping.clip_x0``): the one place every σ-space solver gets its D. A solver reads only D and forms
        ε̂ = (x − D)/σ from it, so its ε̂ is the clipped D's."""
        return clip_x0(self.process.denoised(model_output, sample, sigma), self.config)

    def denoise_with(self, model_call, sample: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; σ) by calling the network itself, ``model_call(x_model, t)``: the process's input scaling and time
        input, then ``denoised``. For the solvers that call the model themselves (``rk45``, the tuner)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        output = model_call(sample * self.process.input_scale(sigma).to(sample.dtype), self.process.timestep(sigma))
        return self.denoised(output, sample, sigma)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """Feed the denoiser's answer at ``timestep``'s evaluation point to the solver; get its next point. A
        timestep other than the current run's next one starts a fresh run there from ``sample``."""
        index = self._index_of_step(timestep)
        denoised = self.denoised(model_output, sample, self.evaluation_sigmas[index])
        self._generator = generator
        if self._run is None or self._run_index != index:
            start = self._start_grid_index(index)
            self._run = self.solver(sample, self.sigmas[start:], self._noise, start)
            next(self._run)
        try:
            _, prev_sample = self._run.send(denoised)
            self._run_index = index + 1
        except StopIteration as finished:
            prev_sample, self._run, self._run_index = finished.value, None, None
        self._step_index = index + 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    # ---------------------------------------------------------------- the forward process (diffusers API)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The scheduler's state at ``timesteps``, x_ve = x0 + σ ε (``SigmaProcess.noised``; diffusers' Euler's
        ``add_noise``): what ``step`` takes at those time inputs."""
        sigma = self._sigma_of_timesteps(timesteps).to(original_samples.device)
        return self.process.noised(original_samples, noise, sigma)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target ᾱ ε − β̄ x0 of a VP model's input at ``timesteps`` (Salimans & Ho 2022)."""
        sigma = self._sigma_of_timesteps(timesteps).to(sample.device)
        return self.process.velocity(sample, noise, sigma)
