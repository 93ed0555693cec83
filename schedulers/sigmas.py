"""Noise-level grids for σ-space samplers: where the solver evaluates the denoiser.

All return a descending float64 tensor σ_0 > … > σ_{n−1} ≥ σ_min, to which the scheduler appends the final
σ = 0 (a last step onto the denoised estimate) unless ``final_sigma="sigma_min"`` ends the run at σ_min.
"""

from __future__ import annotations

import torch

from .process import VPSchedule
from .processes.flow import flow_time, sigma_of_flow_time

SIGMA_SCHEDULES = ("karras", "log_snr", "uniform_t", "subvp", "flow")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid (Karras et al. 2022, eq. 5): uniform in σ^{1/ρ}, dense near σ_min for ρ > 1."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho = 1.0 / rho
    return (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def log_snr_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log σ, i.e. in log-SNR λ = −2 log σ (DPM-Solver's "logSNR" steps; k-diffusion "exponential")."""
    return torch.exp(torch.linspace(torch.log(torch.tensor(sigma_max)), torch.log(torch.tensor(sigma_min)), n,
                                    dtype=torch.float64))


def uniform_time_sigmas(n: int, schedule: VPSchedule, subvp: bool = False) -> torch.Tensor:
    """Uniform in the model's own training time t ∈ [0, T − 1], mapped to σ(t) (DDIM's "linspace" spacing).

    ``subvp``: the sub-VP SDE's noise level at the same times (Song et al. 2021, eq. 31): its marginal
    x_t = ᾱ x0 + (1 − ᾱ²) ε has σ_sub = (1 − ᾱ²)/ᾱ ≤ σ_VP, so the grid spends more steps at low noise.
    """
    t = torch.linspace(schedule.num_train_timesteps - 1, 0, n, dtype=torch.float64)
    if not subvp:
        return schedule.sigma(t)
    acp = schedule.alpha_cumprod(t)
    sigma_sub = (1 - acp) / acp.sqrt()
    return sigma_sub.clamp(min=schedule.sigma(torch.tensor(0.0)).item())


def flow_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in rectified-flow time t = σ/(1 + σ) (Liu et al. 2022, ``processes.flow``), mapped back to σ."""
    t = torch.linspace(flow_time(sigma_max), flow_time(sigma_min), n, dtype=torch.float64)
    return sigma_of_flow_time(t)


def make_sigmas(kind: str, n: int, schedule: VPSchedule, sigma_min: float, sigma_max: float,
                rho: float = 7.0) -> torch.Tensor:
    """The grid named ``kind`` with n points between ``sigma_max`` and ``sigma_min``."""
    if kind == "karras":
        return karras_sigmas(n, sigma_min, sigma_max, rho)
    if kind == "log_snr":
        return log_snr_sigmas(n, sigma_min, sigma_max)
    if kind == "flow":
        return flow_sigmas(n, sigma_min, sigma_max)
    if kind in ("uniform_t", "subvp"):
        return uniform_time_sigmas(n, schedule, subvp=kind == "subvp")
    raise ValueError(f"unknown sigma_schedule {kind!r}; choose one of {SIGMA_SCHEDULES}")
