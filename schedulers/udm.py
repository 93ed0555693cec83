"""Sampling the unified diffusion model (UDM; Su parts 10–11): a corruption x_t = F_t(x0, ε), undone by x̂0-prediction.

The operators F_t (noise, blur, mask, identity) are the forward processes of ``processes/udm.py``. The network
predicts x̂0 = G(x_t, t); ``UDMScheduler`` walks t_0 = T > t_1 > … > 0 with one of three rules
(``udm_rule``; from t to the next step s, Su part 10–11 and Bansal et al. 2022, Alg. 2):

* ``naive``:      x_s = F_s(x̂0, ε'), fresh ε';
* ``improved``:   x_s = x_t + F_s(x̂0, 0) − F_t(x̂0, 0), cold diffusion's correction;
* ``invertible``: x_s = F_s(x̂0, ε̂) with ε̂ = F_t^{-1}(x̂0, x_t) = (x_t − A_t x̂0)/s_t, which needs s_t > 0.
  With ``eta`` > 0 the noise is partly renewed, ε̂ → sqrt(1 − ς²) ε̂ + ς ε' (Su part 10's Gaussian case); for
  ``noise`` ς = η sqrt(1 − ᾱ_t²/ᾱ_s²)/β̄_t, so η = 0 is DDIM and η = 1 DDPM's posterior, exactly; for the
  other operators ς = η.

With a constant s_t (blur, mask) the improved and invertible rules agree except on the last step, where the
invertible one lands on x̂0 and the improved one keeps x_1's noise.

x̂0 is clipped or thresholded first when configured (``clipping.py``); every rule, the invertible one's
ε̂ = F_t^{-1}(x̂0, x_t) included, then reads the clipped x̂0.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput as SchedulerOutput  # prev_sample + x̂0
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .clipping import CLIPPING_DEFAULTS, check_clipping, clip_x0
from .processes import UDMProcess, takes_process_config
from .processes.udm import model_timestep, udm_step
from .registry import register

RULES = ("naive", "improved", "invertible")


@register("udm-naive", family="udm", stochastic=True, processes=("udm-blur", "udm-mask", "udm-noise"),
          defaults={"udm_rule": "naive"}, description="UDM: x_s = F_s(x̂0, fresh ε) (Su part 10's baseline)",
          deliberate={"trained_betas_round_trip": "the blur and mask operators have no β schedule (only the "
                                                  "noise operator reads one), so a UDM scheduler has no betas",
                      "compatibles": "no diffusers scheduler runs the blur or mask operators"})
@register("udm-invertible", family="udm", stochastic=False, processes=("udm-blur", "udm-mask", "udm-noise"),
          defaults={"udm_rule": "invertible"},
          description="UDM: x_s = F_s(x̂0, F_t⁻¹(x̂0, x_t)); DDIM for the noise operator",
          deliberate={"trained_betas_round_trip": "the blur and mask operators have no β schedule (only the "
                                                  "noise operator reads one), so a UDM scheduler has no betas",
                      "compatibles": "no diffusers scheduler runs the blur or mask operators"})
@register("udm-improved", family="udm", stochastic=False, processes=("udm-blur", "udm-mask", "udm-noise"),
          defaults={"udm_rule": "improved"},
          description="UDM: x_s = x_t + F_s(x̂0) − F_t(x̂0) (cold diffusion, Bansal et al. 2022)",
          deliberate={"trained_betas_round_trip": "the blur and mask operators have no β schedule (only the "
                                                  "noise operator reads one), so a UDM scheduler has no betas",
                      "compatibles": "no diffusers scheduler runs the blur or mask operators"})
class UDMScheduler(SchedulerMixin, ConfigMixin):
    """Sampling for x̂0-predicting models of a UDM operator: a diffusers scheduler with its own prior.

    ``set_timesteps(n)`` lays out n + 1 integer steps from T to 0 (evenly, rounded); ``timesteps`` are the
    network's time inputs at the first n. ``step`` takes the model's x̂0 and applies ``udm_rule``.
    """

    order = 1

    @register_to_config
    @takes_process_config({**UDMProcess.config_defaults, **CLIPPING_DEFAULTS})
    def __init__(self, udm_rule: str = "improved", eta: float = 0.0):
        if udm_rule not in RULES:
            raise ValueError(f"unknown udm_rule {udm_rule!r}; choose one of {RULES}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if self.config.prediction_type != "sample":
            raise ValueError(f"UDM models predict x0 (prediction_type 'sample'), got {self.config.prediction_type!r}")
        check_clipping(self.config)
        self.operator = UDMProcess.from_config(self.config).operator
        self.init_noise_sigma = 1.0  # the pipeline starts from ``sample_prior``, already at the operator's scale
        self.set_timesteps(self.config.num_train_timesteps)  # a grid from construction on, as diffusers' schedulers

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, steps=None, timesteps=None):
        """n steps evenly from T down to 0, or ``steps``: strictly descending integers from at most T, ending at 0,
        or ``timesteps``: the network's time inputs at those steps but the last (``self.timesteps``' units)."""
        T = self.config.num_train_timesteps
        if sum(arg is not None for arg in (num_inference_steps, steps, timesteps)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, steps or timesteps")
        if timesteps is not None:
            steps = udm_step(timesteps, T)
            if len(steps) == 0 or torch.any(steps[1:] >= steps[:-1]) or steps[-1] == 0:
                raise ValueError(f"timesteps must descend strictly to a step above 0, got {steps.tolist()} as steps")
            steps = torch.cat([steps, torch.zeros(1, dtype=torch.long)])
        elif steps is None:
            if not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be in [1, {T}] (the process has {T} steps), "
                                 f"got {num_inference_steps}")
            steps = torch.linspace(T, 0, num_inference_steps + 1, dtype=torch.float64).round().long()
        steps = torch.as_tensor(steps).long()
        if steps.ndim != 1 or len(steps) < 2 or steps[0] > T or steps[-1] != 0 or torch.any(steps[1:] >= steps[:-1]):
            raise ValueError(f"steps must descend strictly from at most {T} to 0, got {steps.tolist()}")
        self.steps = steps
        self.num_inference_steps = len(steps) - 1
        self.timesteps = model_timestep(steps[:-1], T).to(device)

    def index_for_timestep(self, timestep) -> int:
        """Position of ``timestep`` in ``timesteps``; ValueError off the grid."""
        t = torch.as_tensor(timestep.cpu() if torch.is_tensor(timestep) else timestep, dtype=torch.float32)
        matches = (self.timesteps.cpu() == t.reshape(())).nonzero().flatten().tolist() if t.numel() == 1 else []
        if not matches:
            raise ValueError(f"timestep {t.tolist()} is not in this scheduler's timesteps {self.timesteps.tolist()}")
        return matches[0]

    def sample_prior(self, shape, generator=None, device=None, dtype=torch.float32, class_labels=None) -> torch.Tensor:
        """x_T drawn from the operator's prior (``UDMOperator.prior``; blur's colour law is per class when
        ``class_labels`` are given and the config has a table); the pipeline starts from it."""
        return self.operator.prior(shape, generator, device, dtype, class_labels)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One move t → s of ``udm_rule`` from the model's x̂0 (``model_output``), clipped as configured."""
        index = self.index_for_timestep(timestep)
        t, s = int(self.steps[index]), int(self.steps[index + 1])
        x0 = clip_x0(model_output.to(sample.dtype), self.config)
        op, rule = self.operator, self.config.udm_rule
        if rule == "naive":
            prev = op.forward(x0, self._fresh(sample, generator), s)
        elif rule == "improved":
            prev = sample + (op.forward(x0, None, s) - op.forward(x0, None, t))
        else:
            eps = op.invert(x0, sample, t)
            renewal = op.renewal(t, s, self.config.eta)
            if renewal > 0:
                eps = math.sqrt(1 - renewal**2) * eps + renewal * self._fresh(sample, generator)
            prev = op.forward(x0, eps, s)
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    @staticmethod
    def _fresh(like: torch.Tensor, generator) -> torch.Tensor:
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """F_t(x0, ε) at ``timesteps``, time inputs in ``self.timesteps``' units (step t ↔ t · 1000/T)."""
        return self.operator.forward(original_samples, noise, udm_step(timesteps, self.config.num_train_timesteps))
