"""The unified diffusion model (UDM; Su parts 10–11): any corruption x_t = F_t(x0, ε), undone by x̂0-prediction.

Every operator here is linear in x0 with additive Gaussian noise, F_t(x0, ε) = A_t x0 + s_t ε on the integer
steps t = 0 … T, with F_0 the identity (ᾱ_0 = 1, β̄_0 = 0 in Su's convention):

* ``noise``: hot diffusion, A_t = ᾱ_t, s_t = β̄_t of the VP schedule (step t is diffusers' index t − 1);
* ``blur``: heat dissipation (Rissanen et al. 2022, eq. 4): A_t multiplies DCT mode (k, l) by
  exp(−π²(k²/H² + l²/W²) σ_B(t)²/2), Neumann boundaries, σ_B log-spaced from 0.5 to 32 pixels, so F_T is
  the image's mean colour; s_t = ``udm_noise``;
* ``mask``: pixels replaced by ``MASK_VALUE`` in a fixed random order, t/T of them at step t; s_t = ``udm_noise``;
* ``identity``: A_t = 1, s_t = 0 (a sanity case for tests).

A small s_t on the deterministic operators is allowed, and needed: a many-to-one F (everything blurs to one
colour) cannot regenerate detail without noise to pick among the images it merged (Su part 11).

The network predicts x̂0 = G(x_t, t); ``UDMScheduler`` walks t_0 = T > t_1 > … > 0 with one of three rules
(``udm_rule``; from t to the next step s, Su part 10–11 and Bansal et al. 2022, Alg. 2):

* ``naive``:      x_s = F_s(x̂0, ε'), fresh ε';
* ``improved``:   x_s = x_t + F_s(x̂0, 0) − F_t(x̂0, 0), cold diffusion's correction;
* ``invertible``: x_s = F_s(x̂0, ε̂) with ε̂ = F_t^{-1}(x̂0, x_t) = (x_t − A_t x̂0)/s_t, which needs s_t > 0.
  With ``eta`` > 0 the noise is partly renewed, ε̂ → sqrt(1 − ς²) ε̂ + ς ε' (Su part 10's Gaussian case); for
  ``noise`` ς = η sqrt(1 − ᾱ_t²/ᾱ_s²)/β̄_t, so η = 0 is DDIM and η = 1 DDPM's posterior, exactly; for the
  other operators ς = η.

With a constant s_t (blur, mask) the improved and invertible rules agree except on the last step, where the
invertible one lands on x̂0 and the improved one keeps x_1's noise.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput as SchedulerOutput  # prev_sample + x̂0
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .process import VPSchedule, expand_to
from .registry import register

OPERATORS = ("noise", "blur", "mask", "identity")
RULES = ("naive", "improved", "invertible")
BLUR_SIGMA_MIN, BLUR_SIGMA_MAX = 0.5, 32.0  # pixels; the lowest mode of 32 px keeps exp(−π²/32²·512) = 0.7%
MASK_VALUE = 0.0  # grey in [−1, 1]: distinct from MNIST's black background
MASK_ORDER_SEED = 0
MODEL_TIME_SCALE = 1000  # the network sees t · 1000/T: a UNet's time embedding spans the range a DDPM's does


def model_timestep(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The time input of the network at UDM step t."""
    return torch.as_tensor(t, dtype=torch.float32) * (MODEL_TIME_SCALE / num_train_timesteps)


def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix C (n × n), rows = frequencies: C @ v is the DCT of v."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


class UDMOperator:
    """F_t(x0, ε) = A_t x0 + s_t ε for one of ``OPERATORS`` on T steps; ``t`` is a (B,) integer tensor."""

    def __init__(self, name: str, num_train_timesteps: int, noise: float = 0.01, schedule: VPSchedule | None = None,
                 prior_mean=None, prior_std=None):
        if name not in OPERATORS:
            raise ValueError(f"unknown UDM operator {name!r}; choose one of {OPERATORS}")
        if num_train_timesteps < 1:
            raise ValueError(f"a UDM process needs at least one step, got num_train_timesteps={num_train_timesteps}")
        if noise < 0:
            raise ValueError(f"udm_noise must not be negative, got {noise}")
        if name == "noise" and (schedule is None or schedule.num_train_timesteps != num_train_timesteps):
            raise ValueError("the noise operator needs the VP schedule of num_train_timesteps steps")
        self.name, self.T, self.noise, self.schedule = name, num_train_timesteps, noise, schedule
        self.prior_mean, self.prior_std = prior_mean, prior_std
        steps = torch.arange(num_train_timesteps, dtype=torch.float64) / max(num_train_timesteps - 1, 1)
        self.blur_sigmas = BLUR_SIGMA_MIN * (BLUR_SIGMA_MAX / BLUR_SIGMA_MIN) ** steps  # σ_B(1) … σ_B(T)

    def _check(self, t) -> torch.Tensor:
        t = torch.as_tensor(t).long().reshape(-1)
        if t.min() < 0 or t.max() > self.T:
            raise ValueError(f"UDM steps must lie in [0, {self.T}], got {t.min().item()} … {t.max().item()}")
        return t

    def noise_scale(self, t) -> torch.Tensor:
        """s_t, float64 (B,); 0 at t = 0."""
        t = self._check(t)
        if self.name == "identity":
            return torch.zeros(len(t), dtype=torch.float64)
        if self.name == "noise":
            _, beta = self.schedule.coefficients((t - 1).clamp(min=0))
            return torch.where(t > 0, beta, 0.0)
        return torch.where(t > 0, self.noise, 0.0).double()

    def signal(self, t) -> torch.Tensor:
        """ᾱ_t of the noise operator (1 at t = 0)."""
        t = self._check(t)
        alpha, _ = self.schedule.coefficients((t - 1).clamp(min=0))
        return torch.where(t > 0, alpha, 1.0)

    def degrade(self, x0: torch.Tensor, t) -> torch.Tensor:
        """A_t x0, the noise-free part of F_t (cold diffusion's D(x0, t))."""
        t = self._check(t).to(x0.device).expand(len(x0))
        if self.name == "identity":
            return x0
        if self.name == "noise":
            return expand_to(self.signal(t.cpu()).to(x0.device), x0) * x0
        if self.name == "blur":
            return self._blur(x0, t)
        return self._mask(x0, t)

    def _blur(self, x0, t):
        h, w = x0.shape[-2:]
        ch, cw = _dct_matrix(h).to(x0.device), _dct_matrix(w).to(x0.device)
        freq = (math.pi * torch.arange(h, dtype=torch.float64, device=x0.device) / h)[:, None] ** 2 + \
            (math.pi * torch.arange(w, dtype=torch.float64, device=x0.device) / w)[None, :] ** 2
        sigma = torch.where(t > 0, self.blur_sigmas.to(x0.device)[(t - 1).clamp(min=0)], 0.0)
        decay = torch.exp(-freq * expand_to(sigma**2 / 2, freq[None]))  # (B, H, W)
        coefficients = ch @ x0.double() @ cw.T
        blurred = (ch.T @ (coefficients * decay[:, None]) @ cw).to(x0.dtype)
        return torch.where((t > 0).reshape(-1, 1, 1, 1), blurred, x0)  # t = 0 exactly, not up to the DCT's rounding

    def mask_order(self, h: int, w: int, device=None) -> torch.Tensor:
        """Each pixel's rank in the masking order, scaled to (0, 1]: pixel p is masked at t when rank ≤ t/T."""
        order = torch.randperm(h * w, generator=torch.Generator().manual_seed(MASK_ORDER_SEED))
        return ((order + 1).double() / (h * w)).reshape(h, w).to(device)

    def _mask(self, x0, t):
        masked = self.mask_order(*x0.shape[-2:], x0.device) <= expand_to(t.double() / self.T, x0[:, 0])
        return torch.where(masked[:, None], torch.full_like(x0, MASK_VALUE), x0)

    def forward(self, x0: torch.Tensor, eps: torch.Tensor | None, t) -> torch.Tensor:
        """F_t(x0, ε); ``eps=None`` gives the noise-free F_t(x0, 0)."""
        x = self.degrade(x0, t)
        if eps is None:
            return x
        t = self._check(t).expand(len(x0))
        return x + expand_to(self.noise_scale(t).to(x0.device), x0) * eps

    def invert(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """ε̂ = F_t^{-1}(x0, x_t) = (x_t − A_t x0)/s_t; ValueError where s_t = 0 (F_t is not invertible in ε)."""
        scale = self.noise_scale(t)
        if torch.any(scale <= 0):
            raise ValueError(f"the {self.name} operator with udm_noise={self.noise} is not invertible in ε at step "
                             f"{self._check(t).tolist()}: use udm_rule 'improved' or 'naive', or udm_noise > 0")
        return (x_t - self.degrade(x0, t)) / expand_to(scale.to(x_t.device), x_t).to(x_t.dtype)

    def renewal(self, t, s, eta: float) -> float:
        """ς: the fraction of fresh noise the invertible rule mixes in on the step t → s (module docstring)."""
        if eta == 0 or s == 0:
            return 0.0
        if self.name == "noise":
            alpha_t, alpha_s = self.signal(t), self.signal(s)
            return float(eta * (1 - (alpha_t / alpha_s) ** 2).sqrt() / self.noise_scale(t))
        return float(eta)

    def prior(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """x_T ~ F_T(x0, ε): N(0, I) for noise (ᾱ_T x0 dropped, as DDPM), the mask value plus noise for mask,
        a constant colour drawn from N(prior_mean, prior_std²) per channel plus noise for blur (F_T(x0) is x0's
        mean colour: the objective records its statistics), and identity's is Gaussian (a test case only)."""
        eps = randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float64)
        if self.name in ("noise", "identity"):
            return eps.to(dtype)
        if self.name == "mask":
            return (MASK_VALUE + self.noise * eps).to(dtype)
        if self.prior_mean is None or self.prior_std is None:
            raise ValueError("the blur operator's prior needs udm_prior_mean and udm_prior_std (per channel)")
        mean = torch.as_tensor(self.prior_mean, dtype=torch.float64, device=eps.device)
        std = torch.as_tensor(self.prior_std, dtype=torch.float64, device=eps.device)
        if len(mean) != shape[1] or len(std) != shape[1]:
            raise ValueError(f"udm_prior_mean/std have {len(mean)}/{len(std)} channels, the images {shape[1]}")
        colour = randn_tensor((shape[0], shape[1], 1, 1), generator=generator, device=device, dtype=torch.float64)
        return (mean[:, None, None] + std[:, None, None] * colour + self.noise * eps).to(dtype)


@register("udm-naive", family="udm", stochastic=True, processes=("udm-blur", "udm-mask", "udm-noise"),
          defaults={"udm_rule": "naive"}, description="UDM: x_s = F_s(x̂0, fresh ε) (Su part 10's baseline)")
@register("udm-invertible", family="udm", stochastic=False, processes=("udm-blur", "udm-mask", "udm-noise"),
          defaults={"udm_rule": "invertible"},
          description="UDM: x_s = F_s(x̂0, F_t⁻¹(x̂0, x_t)); DDIM for the noise operator")
@register("udm-improved", family="udm", stochastic=False, processes=("udm-blur", "udm-mask", "udm-noise"),
          defaults={"udm_rule": "improved"},
          description="UDM: x_s = x_t + F_s(x̂0) − F_t(x̂0) (cold diffusion, Bansal et al. 2022)")
class UDMScheduler(SchedulerMixin, ConfigMixin):
    """Sampling for x̂0-predicting models of a UDM operator: a diffusers scheduler with its own prior.

    ``set_timesteps(n)`` lays out n + 1 integer steps from T to 0 (evenly, rounded); ``timesteps`` are the
    network's time inputs at the first n. ``step`` takes the model's x̂0 and applies ``udm_rule``.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 200,
        udm_operator: str = "blur",
        udm_noise: float = 0.01,
        udm_rule: str = "improved",
        eta: float = 0.0,
        udm_prior_mean: list[float] | None = None,
        udm_prior_std: list[float] | None = None,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: list[float] | None = None,
        prediction_type: str = "sample",
    ):
        if udm_rule not in RULES:
            raise ValueError(f"unknown udm_rule {udm_rule!r}; choose one of {RULES}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if prediction_type != "sample":
            raise ValueError(f"UDM models predict x0 (prediction_type 'sample'), got {prediction_type!r}")
        schedule = VPSchedule.from_config(self.config) if udm_operator == "noise" else None
        self.operator = UDMOperator(udm_operator, num_train_timesteps, udm_noise, schedule, udm_prior_mean,
                                    udm_prior_std)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.steps = torch.zeros(0, dtype=torch.long)
        self.timesteps = torch.zeros(0)
        self._step_index = 0

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device=None, steps=None):
        """n steps evenly from T down to 0, or ``steps``: strictly descending integers from at most T, ending at 0."""
        T = self.config.num_train_timesteps
        if steps is None:
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
        self._step_index = 0

    def sample_prior(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """x_T drawn from the operator's prior (``UDMOperator.prior``); the pipeline starts from it."""
        return self.operator.prior(shape, generator, device, dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One move t → s of ``udm_rule`` from the model's x̂0 (``model_output``)."""
        if self._step_index >= self.num_inference_steps:
            raise ValueError("step() called more often than set_timesteps() planned; call set_timesteps again")
        t, s = int(self.steps[self._step_index]), int(self.steps[self._step_index + 1])
        x0 = model_output.to(sample.dtype)
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
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    @staticmethod
    def _fresh(like: torch.Tensor, generator) -> torch.Tensor:
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """F_t(x0, ε) at UDM steps ``timesteps`` (diffusers' name for the forward process)."""
        return self.operator.forward(original_samples, noise, timesteps)
