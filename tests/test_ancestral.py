"""The one ancestral step (``schedulers.ancestral``): its σ-space reading (k-diffusion's ``get_ancestral_step``), the
marginal it keeps, and the VP state's version that the DDPM/DDIM schedulers take."""

import torch

import schedulers
from schedulers.ancestral import ancestral_step, eta_noise, jump_noise, kept_noise

from .conftest import seeded

ACP = torch.tensor([0.3, 0.6, 0.95], dtype=torch.float64)  # ᾱ² at three grid points, noisiest first


def sigma_of(acp):
    return ((1 - acp) / acp).sqrt()


def test_the_eta_family_is_get_ancestral_step_times_the_next_signal():
    """σ_t = ᾱ' σ_up with k-diffusion's σ_up = η σ' sqrt(σ² − σ'²)/σ, and σ_down² + σ_up² = σ'²."""
    for eta in (0.0, 0.4, 1.0):
        for acp, acp_next in ((ACP[0], ACP[1]), (ACP[1], ACP[2])):
            sigma, sigma_next = sigma_of(acp), sigma_of(acp_next)
            sigma_up = eta * sigma_next * (sigma**2 - sigma_next**2).sqrt() / sigma
            std = eta_noise(acp, acp_next, eta)
            assert torch.allclose(std, acp_next.sqrt() * sigma_up)
            kept = kept_noise(1 - acp_next, std)
            assert torch.allclose(kept**2 + std**2, 1 - acp_next)  # the marginal β̄'² is kept
            assert torch.allclose(kept, acp_next.sqrt() * (sigma_next**2 - sigma_up**2).sqrt())


def test_eta_one_is_the_ddpm_posterior_and_the_jump_is_beta():
    acp, acp_next = ACP[0], ACP[1]
    beta_sq = 1 - acp / acp_next
    assert torch.allclose(eta_noise(acp, acp_next, 1.0) ** 2, (1 - acp_next) / (1 - acp) * beta_sq)
    assert torch.allclose(jump_noise(acp, acp_next) ** 2, beta_sq)


def test_a_deterministic_step_is_euler_in_sigma():
    """With no fresh noise, D + σ' ε̂ is the Euler step x + (σ' − σ)(x − D)/σ of dx/dσ = (x − D)/σ."""
    x0 = torch.randn(5, 3, generator=seeded(0), dtype=torch.float64)
    x = x0 + 2.0 * torch.randn(5, 3, generator=seeded(1), dtype=torch.float64)
    denoised = 0.9 * x0
    sigma, sigma_next = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    eps = (x - denoised) / sigma
    step = ancestral_step(denoised, eps, torch.tensor(1.0, dtype=torch.float64), sigma_next**2,
                          torch.zeros((), dtype=torch.float64))
    assert torch.allclose(step, x + (sigma_next - sigma) * (x - denoised) / sigma)


def test_the_vp_scheduler_takes_the_sigma_space_step_times_the_next_signal():
    """One DDIM η = 1 step with given noise equals ᾱ' (D + σ_down ε̂ + σ_up z) computed in σ-space."""
    scheduler = schedulers.DDIMScheduler(clip_sample=False, eta=1.0)
    scheduler.set_timesteps(10)
    t, t_next = int(scheduler.timesteps[3]), int(scheduler.timesteps[4])
    x, output, z = (torch.randn(4, 1, 2, 2, generator=seeded(k), dtype=torch.float64) for k in range(3))
    ours = scheduler.step(output, t, x, variance_noise=z).prev_sample
    acp, acp_next = scheduler.alphas_cumprod[t].double(), scheduler.alphas_cumprod[t_next].double()
    sigma, sigma_next = sigma_of(acp), sigma_of(acp_next)
    x_ve, denoised = x / acp.sqrt(), (x - (1 - acp).sqrt() * output) / acp.sqrt()
    sigma_up = sigma_next * (sigma**2 - sigma_next**2).sqrt() / sigma
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    expected = acp_next.sqrt() * (denoised + sigma_down * (x_ve - denoised) / sigma + sigma_up * z)
    assert torch.allclose(ours, expected, atol=1e-12)
