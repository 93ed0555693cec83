"""The unified diffusion model's forward processes (UDM; Su parts 10–11): x_t = F_t(x0, ε), one per operator.

Every operator here is linear in x0 with additive Gaussian noise, F_t(x0, ε) = A_t x0 + s_t ε on the integer
steps t = 0 … T, with F_0 the identity (ᾱ_0 = 1, β̄_0 = 0 in Su's convention):

* ``noise``: hot diffusion, A_t = ᾱ_t, s_t = β̄_t of the VP schedule (step t is diffusers' index t − 1);
* ``blur``: heat dissipation (Rissanen et al. 2022, eq. 4): A_t multiplies DCT mode (k, l) by
  exp(−π²(k²/H² + l²/W²) σ_B(t)²/2), Neumann boundaries, σ_B log-spaced from 0.5 to 32 pixels, so F_T is
  the image's mean colour; s_t = ``udm_noise``;
* ``mask``: pixels replaced by ``MASK_VALUE`` in a fixed random order, t/T of them at step t; s_t = ``udm_noise``;
* ``identity``: A_t = 1, s_t = 0 (a sanity case for tests).

A small s_t on the deterministic operators is allowed, and needed: a many-to-one F (everything blurs to one
colour) cannot regenerate detail without noise to pick among the images it merged (Su part 11). The network
predicts x̂0 = G(x_t, t) at time input t · 1000/T, trained at t ~ U{1, …, T} (``UDMProcess``); ``udm.py`` samples.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..process import VPSchedule, expand_to
from .base import SCHEDULE_DEFAULTS, Process, TrainingExample

OPERATORS = ("noise", "blur", "mask", "identity")
BLUR_SIGMA_MIN, BLUR_SIGMA_MAX = 0.5, 32.0  # pixels; the lowest mode of 32 px keeps exp(−π²/32²·512) = 0.7%
MASK_VALUE = 0.0  # grey in [−1, 1]: distinct from MNIST's black background
MASK_ORDER_SEED = 0
MODEL_TIME_SCALE = 1000  # the network sees t · 1000/T: a UNet's time embedding spans the range a DDPM's does


def model_timestep(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The time input of the network at UDM step t."""
    return torch.as_tensor(t, dtype=torch.float32) * (MODEL_TIME_SCALE / num_train_timesteps)


def udm_step(timestep, num_train_timesteps: int) -> torch.Tensor:
    """The integer UDM step t of a time input (the inverse of ``model_timestep``); ValueError off the step grid."""
    scaled = torch.as_tensor(timestep.cpu() if torch.is_tensor(timestep) else timestep,
                             dtype=torch.float64).reshape(-1) * (num_train_timesteps / MODEL_TIME_SCALE)
    steps = scaled.round()
    if torch.any((scaled - steps).abs() > 1e-3) or torch.any(steps < 0) or torch.any(steps > num_train_timesteps):
        raise ValueError(f"timesteps {scaled.mul(MODEL_TIME_SCALE / num_train_timesteps).tolist()} are not time "
                         f"inputs of UDM steps 0 … {num_train_timesteps} (step t has time input t · "
                         f"{MODEL_TIME_SCALE}/{num_train_timesteps})")
    return steps.long()


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
                 prior_mean=None, prior_std=None, prior_class_mean=None, prior_class_std=None):
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
        self.prior_class_mean, self.prior_class_std = prior_class_mean, prior_class_std
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

    def prior(self, shape, generator=None, device=None, dtype=torch.float32, class_labels=None) -> torch.Tensor:
        """x_T ~ F_T(x0, ε): N(0, I) for noise (ᾱ_T x0 dropped, as DDPM), the mask value plus noise for mask,
        a constant colour plus noise for blur, and identity's is Gaussian (a test case only).

        Blur's colour: F_T(x0) is x0's mean colour, and the heat equation keeps the mean (its DCT mode (0, 0) has
        factor 1), and so do the improved and invertible rules (x_s − x_t is a difference of blurs of x̂0): the
        sample's mean colour is the prior's. It is drawn from N(μ_c, s_c²) per channel for an image of class c
        (``prior_class_mean``/``_std``, one row per class, from the training images of that class), or from the
        statistics of all classes (``prior_mean``/``_std``) for an unconditional image, a label outside the table,
        or a model with no table. A single law for every class makes a 1 with a 0's ink, which the network can
        only turn into a wrong digit.
        """
        eps = randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float64)
        if self.name in ("noise", "identity"):
            return eps.to(dtype)
        if self.name == "mask":
            return (MASK_VALUE + self.noise * eps).to(dtype)
        mean, std = self._colour_law(shape, class_labels, eps.device)
        colour = randn_tensor((shape[0], shape[1], 1, 1), generator=generator, device=device, dtype=torch.float64)
        return (mean[:, :, None, None] + std[:, :, None, None] * colour + self.noise * eps).to(dtype)

    def _colour_law(self, shape, class_labels, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) mean and standard deviation of each image's prior colour (see ``prior``)."""
        if self.prior_mean is None or self.prior_std is None:
            raise ValueError("the blur operator's prior needs udm_prior_mean and udm_prior_std (per channel)")
        mean = torch.as_tensor(self.prior_mean, dtype=torch.float64, device=device).reshape(1, -1)
        std = torch.as_tensor(self.prior_std, dtype=torch.float64, device=device).reshape(1, -1)
        if mean.shape[1] != shape[1] or std.shape[1] != shape[1]:
            raise ValueError(f"udm_prior_mean/std have {mean.shape[1]}/{std.shape[1]} channels, the images {shape[1]}")
        mean, std = mean.expand(shape[0], -1), std.expand(shape[0], -1)
        if class_labels is None or self.prior_class_mean is None or self.prior_class_std is None:
            return mean, std
        class_mean = torch.as_tensor(self.prior_class_mean, dtype=torch.float64, device=device)
        class_std = torch.as_tensor(self.prior_class_std, dtype=torch.float64, device=device)
        if class_mean.shape != class_std.shape or class_mean.ndim != 2 or class_mean.shape[1] != shape[1]:
            raise ValueError(f"udm_prior_class_mean/std must be (classes, {shape[1]}) tables, got "
                             f"{tuple(class_mean.shape)} and {tuple(class_std.shape)}")
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1).expand(shape[0])
        known = (labels >= 0) & (labels < len(class_mean))
        rows = labels.clamp(0, len(class_mean) - 1)
        return (torch.where(known[:, None], class_mean[rows], mean),
                torch.where(known[:, None], class_std[rows], std))




class UDMProcess(Process):
    """x_t = F_t(x0, ε) for a ``UDMOperator``; the network predicts x0. One subclass per operator names it."""

    operator_name: str
    config_defaults = {**SCHEDULE_DEFAULTS, "num_train_timesteps": 200, "prediction_type": "sample",
                       "udm_operator": "blur", "udm_noise": 0.01, "udm_prior_mean": None, "udm_prior_std": None,
                       "udm_prior_class_mean": None, "udm_prior_class_std": None}

    def __init__(self, operator: UDMOperator):
        self.operator = operator

    @classmethod
    def from_config(cls, config) -> UDMProcess:
        name = config["udm_operator"]
        schedule = VPSchedule.from_config(config) if name == "noise" else None
        return cls(UDMOperator(name, config["num_train_timesteps"], config["udm_noise"], schedule,
                               config.get("udm_prior_mean"), config.get("udm_prior_std"),
                               config.get("udm_prior_class_mean"), config.get("udm_prior_class_std")))

    def training_example(self, x0, noise, time) -> TrainingExample:
        """``time``: integer steps t ∈ {1, …, T}, (B,)."""
        noisy = self.operator.forward(x0, noise, time)
        return TrainingExample(noisy, model_timestep(time, self.operator.T).to(x0.device), x0,
                               torch.ones(len(x0), device=x0.device))


class UDMBlurProcess(UDMProcess):
    name, label, operator_name = "udm-blur", "UDM, blur operator", "blur"


class UDMMaskProcess(UDMProcess):
    name, label, operator_name = "udm-mask", "UDM, masking operator", "mask"


class UDMNoiseProcess(UDMProcess):
    name, label, operator_name = "udm-noise", "UDM, Gaussian noise operator", "noise"


UDM_PROCESSES = {cls.operator_name: cls for cls in (UDMBlurProcess, UDMMaskProcess, UDMNoiseProcess)}
