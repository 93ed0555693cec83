"""The one ancestral step that DDPM, DDIM and Analytic-DPM all take (k-diffusion's ``get_ancestral_step`` + Euler).

On x = x0 + σ ε with the denoiser's guess D = x̂0 and ε̂ = (x − D)/σ, a step to the noise level σ' keeps the
marginal N(x0, σ'²) by splitting σ'² into a part σ_down² kept from ε̂ and fresh noise σ_up²:

    x' = D + σ_down ε̂ + σ_up z,        σ_down² + σ_up² = σ'²        (DDIM eq. 12 divided by ᾱ')

A discrete VP scheduler keeps its state as x_t = ᾱ_t (x0 + σ_t ε) (so that it drops into diffusers' pipelines)
and takes the same step multiplied by ᾱ': x' = ᾱ' x̂0 + sqrt(β̄'² − σ_t²) ε̂ + σ_t z, with σ_t = ᾱ' σ_up the
noise in its own units. Each sampler only chooses σ_up (Su parts 2–4, 7):

* DDIM's η family (Song et al. 2021, eq. 16): σ_t = η β̄'/β̄ sqrt(1 − ᾱ²/ᾱ'²), i.e. σ_up = η σ' sqrt(σ² − σ'²)/σ
  (``eta_noise``); η = 1 is DDPM's posterior (``fixed_small``), η = 0 the probability-flow Euler step;
* the jump's own per-step noise σ_t = β_t = sqrt(1 − ᾱ²/ᾱ'²), i.e. σ_up = β_t/ᾱ' (``jump_noise``; Su part 4's
  σ_t = β_t, and DDPM's ``fixed_large``, which keeps η = 1's σ_down);
* Analytic-DPM inflates σ_up by the x̂0 uncertainty and keeps σ_down (``analytic.analytic_noise``).

The families are written on the schedule's ᾱ² (diffusers' ``alphas_cumprod``) rather than on σ: a random UNet makes
1000-step DDIM chaotic (a 1e-15 change of x_T moves the result by 0.35), so matching diffusers' trajectories
(tests/test_diffusers_parity.py) needs its coefficients to the last bit, and σ = β̄/ᾱ rounds them differently.
"""

from __future__ import annotations

import torch


def ancestral_step(denoised: torch.Tensor, eps: torch.Tensor, scale, variance, noise_std, noise=None,
                   kept_std=None) -> torch.Tensor:
    """x' = s' x̂0 + kept · ε̂ + noise_std · z onto a state x' = s' x0 + noise of variance ``variance``.

    σ-space: s' = 1, variance σ'², noise_std σ_up, kept σ_down. VP: s' = ᾱ', variance β̄'² = 1 − ᾱ'². ``kept_std``
    defaults to sqrt(variance − noise_std²), the split that keeps the marginal; samplers that add noise on top of
    it (``fixed_large``, Analytic-DPM) pass the kept part themselves. ``noise=None`` adds none. The coefficients are
    float64, so each term touches the state once.
    """
    if kept_std is None:
        kept_std = kept_noise(variance, noise_std)
    x = scale.to(denoised.dtype) * denoised + kept_std.to(denoised.dtype) * eps
    if noise is not None:
        x = x + noise_std.to(denoised.dtype) * noise
    return x


def kept_noise(variance, noise_std) -> torch.Tensor:
    """sqrt(variance − noise_std²): σ_down (times s'), the part of the next state's noise kept from ε̂."""
    return (variance - noise_std**2).clamp(min=0).sqrt()


def eta_noise(acp: torch.Tensor, acp_next: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_t = η sqrt((β̄'²/β̄²)(1 − ᾱ²/ᾱ'²)) of a jump from ᾱ² to ᾱ'² (DDIM eq. 16; k-diffusion's σ_up times ᾱ')."""
    return eta * ((1 - acp_next) / (1 - acp) * (1 - acp / acp_next)).sqrt()


def sigma_eta_noise(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_up = min(σ', η σ' sqrt(σ² − σ'²)/σ) of a σ-space step (k-diffusion's ``get_ancestral_step``): the η family
    above written on σ, for solvers that walk a σ grid rather than a discrete schedule."""
    return torch.minimum(sigma_next, eta * sigma_next * (sigma**2 - sigma_next**2).clamp(min=0).sqrt() / sigma)


def jump_noise(acp: torch.Tensor, acp_next: torch.Tensor) -> torch.Tensor:
    """β_t = sqrt(1 − ᾱ²/ᾱ'²), the per-step noise of the VP jump from ᾱ² to ᾱ'²."""
    return (1 - acp / acp_next).sqrt()
