"""Analytic-DPM: the optimal reverse variance of a DDIM-family step (Bao et al. 2022; Su parts 7–8).

Treat x0 | x_t as N(x̂0(x_t), σ̄_t² I) instead of a point. The step's mean is unchanged and its variance gains
the uncertainty of x̂0 carried through the posterior mean's x0 coefficient γ_t (Su part 7):

    Var = σ_t² + γ_t² σ̄_t²,    γ_t = ᾱ' − ᾱ sqrt(β̄'² − σ_t²)/β̄,
    σ̄_t² = (β̄_t²/ᾱ_t²) (1 − E‖ε_θ(x_t, t)‖²/d),

with the expectation over x_t ~ p_t (real data noised to t). In σ-space (divide by ᾱ'²) the ancestral step
x' = x̂0 + σ_down (x − x̂0)/σ + σ_up z has x0 coefficient γ_t/ᾱ' = 1 − σ_down/σ and σ̄_t² = σ² (1 − E‖ε_θ‖²/d), so
Analytic-DPM only inflates σ_up:  σ_up² → σ_up² + (σ − σ_down)² (1 − E‖ε_θ‖²/d)  (``analytic_noise``, in the
VP state's units: times ᾱ').

The factor 1 − E‖ε_θ‖²/d is clipped to [0, 1] (spec §6.4). ``estimate_eps_second_moment`` measures E‖ε_θ‖²/d
per training timestep by Monte Carlo; the table lives in the scheduler config (``eps_second_moment``), so the
tuned scheduler saves and loads with the model. ``python -m evaluation.analytic_table MODEL_DIR`` writes such a
scheduler into ``MODEL_DIR/scheduler_analytic``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .process import VPSchedule, to_x0_and_epsilon


def analytic_noise(noise_std, kept_std, scale_next, sigma, eps_second_moment: float) -> torch.Tensor:
    """The noise std of a DDIM-family step with the x̂0 uncertainty added, in the VP state's units (ᾱ' times σ-space):
    sqrt(σ_t² + γ² σ̄²) with γ σ = ᾱ' σ − kept and σ̄² = σ² (1 − E‖ε_θ‖²/d), the factor clipped to [0, 1].

    ``noise_std`` σ_t and ``kept_std`` ᾱ' σ_down are the step's split (``ancestral.py``), ``scale_next`` ᾱ', ``sigma``
    the current σ = β̄/ᾱ (the module docstring; Su part 7)."""
    factor = min(max(1.0 - eps_second_moment, 0.0), 1.0)
    return (noise_std**2 + (scale_next * sigma - kept_std) ** 2 * factor).sqrt()


def analytic_last_std_cap(clip_pixels: float) -> float:
    """The cap on the second-to-last step's std of x_t in Bao et al.'s code (``clip_sigma_idx=1``): noise whose mean
    absolute value is ``clip_pixels`` 8-bit levels of data in [−1, 1], clip_pixels · (2/255) · sqrt(π/2) (E|z| =
    sqrt(2/π) for z ~ N(0, 1)). They use 2 for the linear β schedule and 1 for the cosine one. Without it the
    x̂0 uncertainty at the last noisy step, which the final, noiseless step cannot remove, leaves visible grain."""
    return clip_pixels * (2 / 255) * math.sqrt(math.pi / 2)


@torch.no_grad()
def estimate_eps_second_moment(model, schedule: VPSchedule, images: torch.Tensor, prediction_type: str,
                               labels: torch.Tensor | None = None, num_timesteps: int = 100, batch_size: int = 160,
                               generator: torch.Generator | None = None) -> list[float]:
    """E‖ε_θ(x_t, t)‖²/d at every training timestep, measured on ``num_timesteps`` evenly spaced ones
    (``batch_size`` random images each, as Su's adpm.py) and interpolated linearly in between."""
    T = schedule.num_train_timesteps
    measured_at = np.unique(np.linspace(0, T - 1, num_timesteps).round().astype(int))
    device = next(itertools.chain(model.parameters(), model.buffers())).device  # a UNet has no buffers
    values = []
    for t in tqdm(measured_at, desc="E‖ε‖²/d", leave=False):
        pick = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0 = images[pick].to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        alpha, beta = schedule.coefficients(torch.tensor(int(t)))
        x_t = (alpha * x0 + beta * noise).to(model.dtype)
        kwargs = {} if labels is None else {"class_labels": labels[pick].to(device)}
        output = model(x_t, torch.tensor(int(t), device=device), **kwargs).sample
        _, eps = to_x0_and_epsilon(prediction_type, output.double(), x_t.double(), alpha, beta)
        values.append(float((eps**2).mean()))
    return np.interp(np.arange(T), measured_at, values).tolist()
