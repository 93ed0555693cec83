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

from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)

from .processes import VPProcess, takes_process_config
from .registry import register
from .sigma_base import SIGMA_SPACE_DEFAULTS, SigmaSpaceScheduler


def _per_sample_norm(x):
    return x.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.ndim - 1))


def noise_level_family(noise_level: float, corrector_steps: int = 0, snr: float = 0.16):
    """Euler–Maruyama on the reverse process with ν = λ g, plus optional Langevin correction."""

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
            for _ in range(corrector_steps):
                denoised = yield sigma_next, x
                score = (denoised - x) / sigma_next**2
                z = noise(x)
                delta = 2 * (snr * _per_sample_norm(z) / _per_sample_norm(score).clamp(min=1e-12)) ** 2
                x = x + delta * score + (2 * delta).sqrt() * z
        return x

    return solve


@register("noise-level", family="sde", stochastic=True, knobs={"noise_level": 0.5},
          description="Su's noise-level family between the ODE (λ = 0) and the reverse SDE (λ = 1); λ = 0.5")
@register("sde-pc", family="sde", stochastic=True, knobs={"noise_level": 1.0,
          "corrector_steps": 1}, description="predictor–corrector: Euler–Maruyama + 1 Langevin step (r = 0.16)")
@register("sde-ve", family="sde", stochastic=True, knobs={"noise_level": 1.0},
          defaults={"sigma_schedule": "log_snr"},
          description="reverse VE-SDE, Euler–Maruyama, geometric σ")
@register("sde-subvp", family="sde", stochastic=True, knobs={"noise_level": 1.0},
          defaults={"sigma_schedule": "subvp"},
          description="reverse sub-VP SDE, Euler–Maruyama, uniform in t")
@register("sde-euler-maruyama", family="sde", stochastic=True, knobs={"noise_level": 1.0},
          description="reverse VP-SDE, Euler–Maruyama, uniform in t (Song et al. 2021)")
class ReverseSDEScheduler(SigmaSpaceScheduler):
    """The noise-level family of reverse processes, with an optional Langevin corrector."""

    # Not edm/pfgmpp: its fresh noise is Gaussian, the wrong kernel for PFGM++, and its default grids are VP times.
    supported_processes = ("vp", "flow")

    @register_to_config
    @takes_process_config({**VPProcess.config_defaults, **SIGMA_SPACE_DEFAULTS})
    def __init__(
        self,
        noise_level: float = 1.0,
        corrector_steps: int = 0,
        snr: float = 0.16,
        sigma_schedule: str = "uniform_t",
    ):
        if not 0.0 <= noise_level <= 1.0:
            raise ValueError(f"noise_level must be in [0, 1] (0: the ODE, 1: the reverse SDE), got {noise_level}")
        if corrector_steps < 0 or snr <= 0:
            raise ValueError("corrector_steps must be ≥ 0 and snr > 0")
        self._init_sigma_space()

    def solver(self, x, sigmas, noise, start=0):
        return noise_level_family(self.config.noise_level, self.config.corrector_steps, self.config.snr)(
            x, sigmas, noise)
