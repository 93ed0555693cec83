"""The one ancestral step in σ-space, which DDPM, DDIM and Analytic-DPM all take (k-diffusion's ``get_ancestral_step``).

On x = x0 + σ ε with the denoiser's guess D = x̂0 and ε̂ = (x − D)/σ, a step to the noise level σ' keeps the
marginal N(x0, σ'²) by splitting σ'² into a deterministic part σ_down² and fresh noise σ_up²:

    x' = D + σ_down ε̂ + σ_up z,        σ_down² + σ_up² = σ'²        (DDIM eq. 12 divided by ᾱ')

Each sampler only chooses σ_up (Su parts 2–4, 7):

* DDIM's η family (Song et al. 2021, eq. 16): σ_up = η σ' sqrt(σ² − σ'²)/σ (``ancestral_sigmas``); η = 1 is DDPM's
  posterior (``fixed_small``), η = 0 the probability-flow Euler step;
* σ_t = β_t, the jump's own per-step noise, is σ_up = β_t/ᾱ' (``jump_sigma``; Su part 4, DDPM's ``fixed_large``);
* Analytic-DPM adds the x̂0 uncertainty to σ_up (``analytic.analytic_sigma_up``).

A discrete VP scheduler keeps its state as x_vp = ᾱ x (``scale``), so that it drops into diffusers' pipelines.
"""

from __future__ import annotations

import torch


def ancestral_step(denoised: torch.Tensor, eps: torch.Tensor, sigma_down, sigma_up, noise: torch.Tensor | None = None,
                   scale=1.0) -> torch.Tensor:
    """s' (D + σ_down ε̂ + σ_up z): the step onto σ' in a state kept as s' (x0 + σ' ε) (s' = 1: σ-space; VP: ᾱ').

    The coefficients s', s' σ_down and s' σ_up are formed in float64, so each term touches the state once.
    ``noise=None`` is σ_up = 0.
    """
    scale = torch.as_tensor(scale, dtype=torch.float64)
    x = scale.to(denoised.dtype) * denoised + (scale * sigma_down).to(denoised.dtype) * eps
    if noise is not None:
        x = x + (scale * sigma_up).to(denoised.dtype) * noise
    return x


def down_sigma(sigma_next, sigma_up) -> torch.Tensor:
    """σ_down = sqrt(σ'² − σ_up²), the part of σ' the step keeps from ε̂ (0 where σ_up reaches σ')."""
    return (torch.as_tensor(sigma_next, dtype=torch.float64) ** 2 - sigma_up**2).clamp(min=0).sqrt()


def ancestral_sigmas(sigma, sigma_next, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_down, σ_up) of DDIM's η family: σ_up = η σ' sqrt(σ² − σ'²)/σ (k-diffusion's ``get_ancestral_step``)."""
    sigma, sigma_next = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma, sigma_next))
    sigma_up = eta * sigma_next * (sigma**2 - sigma_next**2).clamp(min=0).sqrt() / sigma
    return down_sigma(sigma_next, sigma_up), sigma_up


def jump_sigma(sigma, sigma_next) -> torch.Tensor:
    """β_t/ᾱ' of the VP jump from σ to σ': its per-step noise β_t² = 1 − ᾱ²/ᾱ'², seen in σ-space (ᾱ² = 1/(1 + σ²))."""
    sigma, sigma_next = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma, sigma_next))
    return ((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)).clamp(min=0).sqrt()
