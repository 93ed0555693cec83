"""The VP forward process, its map to σ-space, and conversions between model parameterizations.

Every sampler in this package works with one picture of the forward process (EDM, Karras et al. 2022, eq. 7):

    x_t = s_t · (x0 + σ_t ε),        ε ~ N(0, I)

``s_t`` is the signal scale and ``σ_t`` the noise level of the variance-exploding (VE) process
``x_ve = x_t / s_t = x0 + σ_t ε``. The families map onto it as follows:

* VP / DDPM:  s = ᾱ_t, σ = β̄_t / ᾱ_t  (Su's notation, ᾱ_t² + β̄_t² = 1; diffusers: ᾱ_t² = ``alphas_cumprod[t]``)
* VE / EDM:   s = 1
* flow:       s = 1 − t, σ = t / (1 − t)  (x_t = (1 − t) x0 + t ε)

Su's per-step α_t, β_t are the DDPM paper's sqrt(α_t), sqrt(β_t); ``betas`` below are always the DDPM
paper's (diffusers') per-step variances. See docs/architecture.md.

A network predicts one of five targets. At fixed (x_t, t) each is an affine function of ε, so any
of them converts to any other exactly (``convert``), and a sampler written once in σ-space drives a
model trained in any parameterization:

* ``epsilon``:      ε                                    (DDPM, Ho et al. 2020)
* ``sample``:       x0                                   (Su part 3, "Bayes + denoising")
* ``v_prediction``: v = ᾱ ε − β̄ x0                      (Salimans & Ho 2022, §4)
* ``score``:        ∇ log p_t(x_t) = −ε / β̄             (Su part 5; Song et al. 2021)
* ``velocity``:     u = ε − x0 = dx_t/dt on the straight path (rectified flow, Liu et al. 2022)
"""

from __future__ import annotations

import math

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "score", "velocity")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "su")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------------------------------
# β schedules (the DDPM paper's per-step variances β_t, t = 1..T)
# --------------------------------------------------------------------------------------------------


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = 1 − ᾱ(t)/ᾱ(t−1) ≤ 0.999.

    Computed in float64 and rounded once, as diffusers' ``squaredcos_cap_v2``.
    """
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    return torch.tensor(betas, dtype=torch.float32)


def su_betas(num_train_timesteps: int) -> torch.Tensor:
    """Su's schedule (part 1; bojone/Keras-DDPM): per-step α_t = sqrt(1 − 0.02 t/T), so β_t^DDPM = 0.02 t/T.

    This defines the per-step α, not the cumulative ᾱ: ᾱ_T = Π α_t ≈ e^{−5} (0.006482 at T = 1000).
    """
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64)
    return (0.02 * t / num_train_timesteps).to(torch.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """The per-step variances β_1..β_T of a named schedule, float32 as diffusers computes them."""
    if beta_schedule == "linear":  # Ho et al. 2020: 1e-4 … 0.02
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(β)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule in ("squaredcos_cap_v2", "cosine"):
        return cosine_betas(num_train_timesteps)
    if beta_schedule == "su":
        return su_betas(num_train_timesteps)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")


# --------------------------------------------------------------------------------------------------
# The discrete VP schedule and its continuous-time interpolation
# --------------------------------------------------------------------------------------------------


class VPSchedule:
    """ᾱ², σ and log-SNR of a discrete VP process at integer or fractional timesteps.

    Timestep ``t`` indexes ``alphas_cumprod`` as in diffusers (t = 0 is the first noisy step). Between
    integer steps, log σ is interpolated linearly, the convention of k-diffusion and diffusers' σ-space
    schedulers (``_sigma_to_t``), so a model evaluated at fractional timesteps answers for the same σ
    whichever library chose them; ``timestep_of_sigma`` is its exact inverse.
    """

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        acp = self.alphas_cumprod.double()
        # log σ = ½ log((1 − ᾱ²)/ᾱ²), increasing in t: interpolated between steps, searched by timestep_of_sigma.
        self._log_sigmas = 0.5 * (torch.log1p(-acp) - torch.log(acp))

    @classmethod
    def from_config(cls, config) -> VPSchedule:
        """Build from a diffusers-style scheduler config (``beta_schedule``, ``trained_betas``, …)."""
        if config.get("trained_betas") is not None:
            return cls(torch.as_tensor(config["trained_betas"], dtype=torch.float32))
        return cls(
            make_betas(
                config["beta_schedule"],
                config["num_train_timesteps"],
                config.get("beta_start", 1e-4),
                config.get("beta_end", 0.02),
            )
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def alpha_cumprod(self, t) -> torch.Tensor:
        """ᾱ²(t) (diffusers' ``alphas_cumprod``), float64; integer t reproduces the table exactly."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if not torch.is_floating_point(t) or torch.all(t == t.round()):
            idx = t.long().clamp(0, self.num_train_timesteps - 1)
            return self.alphas_cumprod.double()[idx]
        t = t.clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        log_sigma = torch.lerp(self._log_sigmas[lo], self._log_sigmas[lo + 1], t - lo)
        return torch.sigmoid(-2 * log_sigma)  # ᾱ² = 1/(1 + σ²)

    def coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ_t, β̄_t) of step t: x_t = ᾱ_t x0 + β̄_t ε (``coefficients_of``)."""
        return coefficients_of(self.alpha_cumprod(t))

    def sigma(self, t) -> torch.Tensor:
        """σ_t = β̄_t/ᾱ_t = sqrt((1 − ᾱ_t²)/ᾱ_t²), the VE noise level of step t."""
        acp = self.alpha_cumprod(t)
        return ((1 - acp) / acp).sqrt()

    def log_snr(self, t) -> torch.Tensor:
        """λ_t = log(ᾱ_t²/β̄_t²) = −2 log σ_t (Kingma et al. 2021)."""
        return -2 * torch.log(self.sigma(t))

    def timestep_of_sigma(self, sigma) -> torch.Tensor:
        """The fractional timestep whose σ is ``sigma``: the inverse of ``sigma`` (clamped to the table)."""
        log_sigma = torch.log(torch.as_tensor(sigma, dtype=torch.float64))
        ls = self._log_sigmas
        hi = torch.searchsorted(ls, log_sigma).clamp(1, len(ls) - 1)
        lo = hi - 1
        w = (log_sigma - ls[lo]) / (ls[hi] - ls[lo])
        return (lo + w.clamp(0, 1)).to(torch.float64)


def coefficients_of(alpha_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ, β̄) = (sqrt(ᾱ²), sqrt(1 − ᾱ²)) from diffusers' ``alphas_cumprod`` value ᾱ² (Su's notation)."""
    return alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()


def expand_to(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample coefficient over the trailing dimensions of ``like``."""
    coefficient = torch.as_tensor(coefficient, device=like.device).to(like.dtype)
    return coefficient.reshape(coefficient.shape + (1,) * (like.ndim - coefficient.ndim))


# --------------------------------------------------------------------------------------------------
# Conversions between parameterizations, at fixed x = ᾱ x0 + β̄ ε
#
# They take the signal and noise coefficients (ᾱ, β̄) rather than (s, σ) = (ᾱ, β̄/ᾱ): the same map, but
# x − β̄ ε never forms the large terms x/ᾱ and σ ε whose float32 cancellation costs digits at high noise.
# σ-space is the special case ᾱ = 1, β̄ = σ; flow is ᾱ = 1 − t, β̄ = t.
# --------------------------------------------------------------------------------------------------


def _to_x0_eps(prediction_type: str, output, x, alpha, beta):
    """(x0, ε) implied by a model output; the one place that inverts each parameterization."""
    if prediction_type == "epsilon":
        return (x - beta * output) / alpha, output  # DDPM eq. 15
    if prediction_type == "sample":
        return output, (x - alpha * output) / beta
    if prediction_type == "v_prediction":
        # v = ᾱ ε − β̄ x0 (Salimans & Ho 2022, appendix D): x0 = (ᾱ x − β̄ v)/(ᾱ² + β̄²), ε = (β̄ x + ᾱ v)/(ᾱ² + β̄²).
        norm = alpha**2 + beta**2
        return (alpha * x - beta * output) / norm, (beta * x + alpha * output) / norm
    if prediction_type == "score":
        eps = -beta * output  # ∇ log p(x_t) = −ε/β̄_t (Su part 5)
        return (x - beta * eps) / alpha, eps
    if prediction_type == "velocity":
        # u = ε − x0 and x = ᾱ x0 + β̄ ε  ⇒  x0 = (x − β̄ u)/(ᾱ + β̄), ε = (x + ᾱ u)/(ᾱ + β̄).
        return (x - beta * output) / (alpha + beta), (x + alpha * output) / (alpha + beta)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def _from_x0_eps(prediction_type: str, x0, eps, alpha, beta):
    """A parameterization's target from (x0, ε): the forward direction of ``_to_x0_eps``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - beta * x0
    if prediction_type == "score":
        return -eps / beta
    if prediction_type == "velocity":
        return eps - x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def to_x0_and_epsilon(prediction_type: str, output: torch.Tensor, x: torch.Tensor, alpha, beta):
    """Decode a model output into (x0, ε) at the state x = ᾱ x0 + β̄ ε; ``alpha``, ``beta`` scalar or per sample."""
    alpha, beta = expand_to(alpha, x), expand_to(beta, x)
    return _to_x0_eps(prediction_type, output, x, alpha, beta)


def target_from_x0_and_epsilon(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, alpha, beta):
    """The training target of a parameterization, given the clean sample and the noise."""
    alpha, beta = expand_to(alpha, x0), expand_to(beta, x0)
    return _from_x0_eps(prediction_type, x0, eps, alpha, beta)


def convert(output: torch.Tensor, from_type: str, to_type: str, x: torch.Tensor, alpha, beta) -> torch.Tensor:
    """Convert a model output between any two of ``PREDICTION_TYPES`` at the state x = ᾱ x0 + β̄ ε."""
    if from_type == to_type:
        return output
    x0, eps = to_x0_and_epsilon(from_type, output, x, alpha, beta)
    return target_from_x0_and_epsilon(to_type, x0, eps, alpha, beta)


# --------------------------------------------------------------------------------------------------
# Inference timestep grids
# --------------------------------------------------------------------------------------------------


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0):
    """Descending integer timesteps for a sampling run (Lin et al. 2024, table 2), as diffusers spaces them.

    ``leading``: 0, k, 2k, … (+ offset); ``trailing``: T−1, T−1−k, …; ``linspace``: rounded linspace(0, T−1).
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, "
            f"got {num_inference_steps}"
        )
    if spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
    elif spacing == "leading":
        ratio = num_train_timesteps // num_inference_steps
        steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_inference_steps
        steps = np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    if steps.max() >= num_train_timesteps:
        raise ValueError(f"steps_offset={steps_offset} pushes timestep {int(steps.max())} past the last training "
                         f"step {num_train_timesteps - 1}; use fewer steps or another spacing")
    return torch.from_numpy(steps.astype(np.int64).copy())
