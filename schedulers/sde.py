"""Reverse-time SDEs in σ-space: the noise-level family and predictor–corrector sampling.

VP, sub-VP and VE SDEs (Song et al. 2021) all have marginals x_t = ᾱ_t (x0 + σ_t ε). In σ-space, x_ve = x/ᾱ,
each is the same Brownian motion d x_ve = sqrt(dσ²/dt) dw run on its own clock σ(t). So one reverse process
serves all three, and the SDE's choice is the time grid: uniform in t of the VP schedule (``uniform_t``),
of sub-VP's σ_sub = (1 − ᾱ²)/ᾱ (``subvp``), or geometric in σ as VE's σ_min (σ_max/σ_min)^t (``log_snr``).

Su part 6: for any noise level ν_t with ν_t² ≤ g_t², dx = −½(g_t² + ν_t²) ∇log p_t dt + ν_t dw̄ has the
forward process's marginals. With g² dt = dσ² = 2σ|dσ|, ∇log p = (D − x)/σ² and ν = λ g, an
Euler–Maruyama step from σ down to σ' = σ − h reads

    x' = x + (1 + λ²) (h/σ) (D − x) + λ sqrt(2 σ h) z,

λ = 0 the probability-flow ODE (Euler), λ = 1 the reverse SDE. The Langevin corrector (Song et al. 2021,
Alg. 5) follows each predictor step with ``corrector_steps`` moves x ← x + δ ∇log p + sqrt(2δ) z at the new σ,
δ = 2 (r ‖z‖/‖∇log p‖)² for a target signal-to-noise ratio r; each costs one more network evaluation.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)

from .ancestral import ancestral_step, sigma_eta_noise
from .ode import multistep_increment
from .processes import GAUSSIAN_SIGMA_PROCESSES, VPProcess, takes_process_config
from .registry import register
from .sigma_base import SIGMA_SPACE_DEFAULTS, SigmaSpaceScheduler

SDE_SOLVERS = ("euler-maruyama", "ancestral", "dpmpp-2m-sde", "dpmpp-3m-sde")


def _per_sample_norm(x):
    return x.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.ndim - 1))


def _langevin(x, sigma, noise, steps: int, snr: float):
    """``steps`` Langevin moves x ← x + δ ∇log p_σ + sqrt(2δ) z at σ (Song et al. 2021, Alg. 5), one evaluation each."""
    for _ in range(steps):
        denoised = yield sigma, x
        score = (denoised - x) / sigma**2
        z = noise(x)
        delta = 2 * (snr * _per_sample_norm(z) / _per_sample_norm(score).clamp(min=1e-12)) ** 2
        x = x + delta * score + (2 * delta).sqrt() * z
    return x


def noise_level_family(noise_level: float, corrector_steps: int = 0, snr: float = 0.16):
    """Euler–Maruyama on the reverse process with ν = λ g, plus optional Langevin correction: the reference
    discretization, literal in σ, whose O(h) error needs many steps on thin data (docs/samplers.md)."""

    def solve(x, sigmas, noise):
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = yield sigma, x
            if sigma_next == 0:  # the last step lands on the denoised estimate
                x = denoised
                continue
            h = sigma - sigma_next
            x = x + (1 + noise_level**2) * (h / sigma) * (denoised - x)
            if noise_level > 0:
                x = x + noise_level * (2 * sigma * h).sqrt() * noise(x)
            x = yield from _langevin(x, sigma_next, noise, corrector_steps, snr)
        return x

    return solve


def ancestral_family(noise_level: float, corrector_steps: int = 0, snr: float = 0.16):
    """Su's noise-level family as ancestral steps (k-diffusion's ``sample_euler_ancestral`` with η = λ).

    Each step holds D fixed and solves the linear part exactly: x' = D + σ_down ε̂ + σ_up z with ε̂ = (x − D)/σ,
    σ_up = min(σ', λ σ' sqrt(σ² − σ'²)/σ) and σ_down² = σ'² − σ_up² (``ancestral.sigma_eta_noise``, the step of
    ``ancestral.ancestral_step``). For h = σ − σ' → 0 it is the Euler–Maruyama step above to first order:
    σ_up² → λ² 2σh and 1 − σ_down/σ → (1 + λ²) h/σ. λ = 0 is Euler on the ODE (DDIM), λ = 1 the reverse SDE's
    ancestral sampler (DDPM's posterior step, Ho et al. 2020). Unlike Euler–Maruyama it never overshoots: the new
    state is D plus noise of exactly σ'², however large the step.
    """

    def solve(x, sigmas, noise):
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = yield sigma, x
            if sigma_next == 0:
                x = denoised
                continue
            sigma_up = sigma_eta_noise(sigma, sigma_next, noise_level)
            x = ancestral_step(denoised, (x - denoised) / sigma, sigma.new_ones(()), sigma_next**2, sigma_up,
                               noise(x) if noise_level > 0 else None)
            x = yield from _langevin(x, sigma_next, noise, corrector_steps, snr)
        return x

    return solve


def _exponential_sde_step(x, denoised, sigma, sigma_next, eta: float, noise):
    """The reverse SDE's exact step for D held fixed (``dpmpp_2m_sde``'s first line), and its h = log(σ/σ')."""
    h = torch.log(sigma / sigma_next)
    sigma_up = sigma_next * (-torch.expm1(-2 * eta * h)).sqrt()
    x = ancestral_step(denoised, (x - denoised) / sigma, sigma.new_ones(()), sigma_next**2, sigma_up,
                       noise(x) if eta > 0 else None)
    return x, h


def dpmpp_2m_sde(noise_level: float, corrector_steps: int = 0, snr: float = 0.16):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, §4 and App. B; k-diffusion's ``sample_dpmpp_2m_sde``, midpoint type).

    The reverse SDE's exact solution for a D held fixed over a step of h = log(σ/σ') is, with η the noise,

        x' = (σ'/σ) e^{−ηh} x + (1 − e^{−(1+η)h}) D + σ' sqrt(1 − e^{−2ηh}) z,

    an ancestral step with σ_down = σ' e^{−ηh}, σ_up = σ' sqrt(1 − e^{−2ηh}) (η = 1: the same σ_up as Euler
    ancestral, DDPM's). The second-order term extrapolates D linearly in λ = −log σ from the previous step,
    + ½ (1 − e^{−(1+η)h}) (D − D₋₁) h/h₋₁ (the midpoint variant); the first step and a run started mid-grid have no
    history and take the first-order step. Su's λ maps to η = λ² (the same first-order limit as
    ``ancestral_family``'s), so λ = 0 is diffusers' DPM-Solver++(2M) ODE and λ = 1 k-diffusion's η = 1.
    """
    eta = noise_level**2

    def solve(x, sigmas, noise):
        previous = None  # (D₋₁, h₋₁)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = yield sigma, x
            if sigma_next == 0:
                x = denoised
                continue
            x, h = _exponential_sde_step(x, denoised, sigma, sigma_next, eta, noise)
            if previous is not None:
                d1, h1 = previous
                x = x - 0.5 * torch.expm1(-(1 + eta) * h) * (h / h1) * (denoised - d1)
            previous = (denoised, h)
            x = yield from _langevin(x, sigma_next, noise, corrector_steps, snr)
        return x

    return solve


def dpmpp_3m_sde(noise_level: float, corrector_steps: int = 0, snr: float = 0.16):
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``; diffusers' ``sde-dpmsolver++`` of order 3).

    ``dpmpp_2m_sde``'s exact linear part, with D expanded to second order in λ from the two previous steps. Over
    the step the SDE's linear part decays as e^{−(1+η)(h − s)}, so integrating D(λ + s) = D + s D' + s² D''/2
    against it gives the ODE's φ-terms (``ode.dpmpp_multistep``) taken over h_η = (1 + η) h:

        x' = (σ'/σ) e^{−ηh} x + (1 − e^{−h_η}) D + φ₂(h_η) d₁ − 2 φ₃(h_η) c + σ' sqrt(1 − e^{−2ηh}) z,

    d₁ ≈ h D' and c ≈ h² D''/2 the divided differences (``ode.multistep_increment``). The curvature term is taken
    at k-diffusion's weight, −φ₃ c, half the integral's: at NFE 10 on six development mixtures (docs/samplers.md)
    it left the lower sliced-W2 gap on all six, on log-SNR and on Karras steps. The first step is first order and
    the second takes φ₂ d₁ alone (η = λ², as in ``dpmpp_2m_sde``). The last step before the final denoise is
    first order, as diffusers' solvers below 15 steps (``lower_order_final``): with it the gap was lower on all
    six again (on Karras steps 0.07–0.09 without it, where the last step is the longest in λ).
    """
    eta = noise_level**2

    def solve(x, sigmas, noise):
        history = []  # (D, h) of the previous steps, newest first
        last = len(sigmas) - 2 - int(sigmas[-1] == 0)  # the last step that does not land on the final denoise
        for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            denoised = yield sigma, x
            if sigma_next == 0:
                x = denoised
                continue
            x, h = _exponential_sde_step(x, denoised, sigma, sigma_next, eta, noise)
            if step < last:
                x = x + multistep_increment(denoised, history, h, (1 + eta) * h, curvature_weight=1.0)
            history = [(denoised, h), *history][:2]
            x = yield from _langevin(x, sigma_next, noise, corrector_steps, snr)
        return x

    return solve


FAMILIES = dict(zip(SDE_SOLVERS, (noise_level_family, ancestral_family, dpmpp_2m_sde, dpmpp_3m_sde)))


# The exponential / ancestral discretizations. Euler ancestral and the noise-level family on Karras grids (ρ = 7,
# k-diffusion's); 2M SDE on uniform log-SNR steps, as dpmpp-2m: on the tuning and benchmark mixtures of
# bench/samplers.py (seeds 1 and 0) it leaves a sliced-W2 gap of .0034 and −.0001 at NFE 10 there, .0095 and
# .0128 on Karras steps.
@register("dpmpp-3m-sde", family="sde", stochastic=True, knobs={"noise_level": 1.0},
          processes=GAUSSIAN_SIGMA_PROCESSES, defaults={"solver": "dpmpp-3m-sde", "sigma_schedule": "log_snr"},
          description="DPM-Solver++(3M) SDE, η = 1, uniform log-SNR steps, first-order last step (k-diffusion)")
@register("dpmpp-2m-sde", family="sde", stochastic=True, knobs={"noise_level": 1.0},
          processes=GAUSSIAN_SIGMA_PROCESSES, defaults={"solver": "dpmpp-2m-sde", "sigma_schedule": "log_snr"},
          description="DPM-Solver++(2M) SDE, midpoint, η = 1, uniform log-SNR steps (Lu et al. 2022; k-diffusion)")
@register("euler-ancestral", family="sde", stochastic=True, knobs={"noise_level": 1.0},
          processes=GAUSSIAN_SIGMA_PROCESSES, defaults={"solver": "ancestral", "sigma_schedule": "karras"},
          description="Euler ancestral (k-diffusion's sample_euler_ancestral, η = 1), Karras steps")
@register("noise-level", family="sde", stochastic=True, knobs={"noise_level": 0.5},
          processes=GAUSSIAN_SIGMA_PROCESSES, defaults={"solver": "ancestral", "sigma_schedule": "karras"},
          description="Su's noise-level family between the ODE (λ = 0) and the reverse SDE (λ = 1) as ancestral "
                      "steps (η = λ); λ = 0.5, Karras steps")
# Euler–Maruyama, the reference discretization: literal in σ, it needs many steps (min_nfe: docs/samplers.md).
@register("sde-pc", family="sde", stochastic=True, knobs={"noise_level": 1.0, "corrector_steps": 1}, min_nfe=40,
          description="predictor–corrector: Euler–Maruyama (the reference discretization) + 1 Langevin step "
                      "(r = 0.16)")
@register("sde-ve", family="sde", stochastic=True, knobs={"noise_level": 1.0}, min_nfe=16,
          defaults={"sigma_schedule": "log_snr"},
          description="reverse VE-SDE, Euler–Maruyama (the reference discretization), geometric σ")
@register("sde-subvp", family="sde", stochastic=True, knobs={"noise_level": 1.0}, min_nfe=16,
          defaults={"sigma_schedule": "subvp"},
          description="reverse sub-VP SDE, Euler–Maruyama (the reference discretization), uniform in t")
@register("sde-euler-maruyama", family="sde", stochastic=True, knobs={"noise_level": 1.0}, min_nfe=20,
          description="reverse VP-SDE, Euler–Maruyama, uniform in t: the reference discretization (Song et al. 2021)")
class ReverseSDEScheduler(SigmaSpaceScheduler):
    """The noise-level family of reverse processes, with an optional Langevin corrector."""

    # Not pfgmpp: its fresh noise is Gaussian, the wrong kernel for PFGM++. Not edm by default: the default grid is
    # VP times; the entries on Karras grids drive edm models too.
    supported_processes = ("vp", "flow")

    @register_to_config
    @takes_process_config({**VPProcess.config_defaults, **SIGMA_SPACE_DEFAULTS})
    def __init__(
        self,
        noise_level: float = 1.0,
        solver: str = "euler-maruyama",
        corrector_steps: int = 0,
        snr: float = 0.16,
        sigma_schedule: str = "uniform_t",
    ):
        if not 0.0 <= noise_level <= 1.0:
            raise ValueError(f"noise_level must be in [0, 1] (0: the ODE, 1: the reverse SDE), got {noise_level}")
        if solver not in SDE_SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {SDE_SOLVERS}")
        if corrector_steps < 0 or snr <= 0:
            raise ValueError("corrector_steps must be ≥ 0 and snr > 0")
        self._init_sigma_space()

    def solver(self, x, sigmas, noise, start=0):
        family = FAMILIES[self.config.solver]
        return family(self.config.noise_level, self.config.corrector_steps, self.config.snr)(x, sigmas, noise)
