"""Probability-flow ODE solvers in σ-space (Song et al. 2021; Su part 6; Karras et al. 2022).

With x = x0 + σ ε and the denoiser D(x; σ) = E[x0 | x], the probability-flow ODE is

    dx/dσ = (x − D(x; σ)) / σ                       (EDM eq. 4 with s ≡ 1)

and in λ = −log σ its linear part integrates exactly, which the exponential integrators use (Lu et al. 2022b):
x_{σ'} = (σ'/σ) x_σ + (1 − σ'/σ) D  for a D held constant over the step (this first-order step is DDIM).
A step onto σ = 0 returns the denoised estimate: the last point of a "zero"-terminated grid.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)

from .registry import register
from .sigma_base import SigmaSpaceScheduler


def _pairs(sigmas):
    return zip(sigmas[:-1], sigmas[1:])


def euler(x, sigmas, noise):
    """Euler in σ (EDM Alg. 1 without the correction): first order, 1 NFE per step; equals DDIM η = 0."""
    for sigma, sigma_next in _pairs(sigmas):
        denoised = yield sigma, x
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x


def heun(x, sigmas, noise):
    """Heun's method (EDM Alg. 1): second order, 2 NFE per step, Euler on the final step onto σ = 0."""
    for sigma, sigma_next in _pairs(sigmas):
        denoised = yield sigma, x
        slope = (x - denoised) / sigma
        x_euler = x + (sigma_next - sigma) * slope
        if sigma_next == 0:
            x = x_euler
            continue
        denoised_next = yield sigma_next, x_euler
        x = x + (sigma_next - sigma) * (slope + (x_euler - denoised_next) / sigma_next) / 2
    return x


def midpoint(x, sigmas, noise):
    """Explicit midpoint, the midpoint taken in log σ (k-diffusion's DPM-2): second order, 2 NFE per step."""
    for sigma, sigma_next in _pairs(sigmas):
        denoised = yield sigma, x
        if sigma_next == 0:
            x = denoised
            continue
        sigma_mid = (sigma * sigma_next).sqrt()
        x_mid = x + (sigma_mid - sigma) * (x - denoised) / sigma
        denoised_mid = yield sigma_mid, x_mid
        x = x + (sigma_next - sigma) * (x_mid - denoised_mid) / sigma_mid
    return x


def dpmpp_multistep(order: int):
    """DPM-Solver++ multistep of order 2 or 3 (Lu et al. 2022b, Alg. 2 and its third-order analogue): an
    exponential integrator in λ = −log σ that extrapolates D from the previous steps with φ-functions.

    Over a step of size h the exact solution is (σ'/σ) x + (1 − e^{−h}) D + h φ₂ D' − h² φ₃ D'' + O(h⁴),
    with φ₂ = 1 + (e^{−h} − 1)/h, φ₃ = φ₂/h − ½ and D', D'' derivatives in λ. From the last three values,
    d₁ ≈ h D' and c = (d₁⁰ − d₁¹)/(r₀ + r₁) ≈ h² D''/2, so the curvature term is −2 φ₃ c. (k-diffusion's
    ``sample_dpmpp_3m_sde`` and diffusers' ``multistep_dpm_solver_third_order_update`` add −φ₃ c, half of it;
    on the exact-score test their formula measures order 2.2, this one 3.0 — tests/test_ode_order.py.)

    The first step has no history, and a first-order start alone would cap the global error at O(h²), so
    the third-order solver starts with DPM-Solver++(2S), the midpoint in λ, for one extra evaluation.
    1 NFE per step otherwise.
    """

    def solve(x, sigmas, noise):
        history = []  # (denoised, h) of the previous steps, newest first
        for sigma, sigma_next in _pairs(sigmas):
            denoised = yield sigma, x
            if sigma_next == 0:
                x = denoised
                continue
            h = torch.log(sigma / sigma_next)
            if order >= 3 and not history:
                sigma_mid = (sigma * sigma_next).sqrt()
                x_mid = (sigma_mid / sigma) * x - torch.expm1(-h / 2) * denoised
                denoised_mid = yield sigma_mid, x_mid
                x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_mid
                history = [(denoised, h)]
                continue
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised
            phi_2 = torch.expm1(-h) / h + 1
            if order >= 3 and len(history) >= 2:
                (d1, h1), (d2, h2) = history[:2]
                r0, r1 = h1 / h, h2 / h
                slope_0 = (denoised - d1) / r0
                slope_1 = (d1 - d2) / r1
                curvature = (slope_0 - slope_1) / (r0 + r1)
                phi_3 = phi_2 / h - 0.5
                x = x + phi_2 * (slope_0 + curvature * r0) - 2 * phi_3 * curvature
            elif history:
                d1, h1 = history[0]
                x = x + phi_2 * (denoised - d1) / (h1 / h)
            history = [(denoised, h), *history][:2]
        return x

    return solve


def flow_heun(x, sigmas, noise):
    """Heun on the rectified-flow ODE dz/dt = u = ε̂ − x̂0 (Liu et al. 2022; Su part 17): the same model, seen
    in flow coordinates z = x/(1 + σ), t = σ/(1 + σ), where x = x0 + σ ε becomes z = (1 − t) x0 + t ε. Euler
    in these coordinates holds (x̂0, ε̂) fixed and is DDIM again; Heun is not, its correction follows u."""
    for sigma, sigma_next in _pairs(sigmas):
        denoised = yield sigma, x
        t, t_next = sigma / (1 + sigma), sigma_next / (1 + sigma_next)
        z = x / (1 + sigma)
        velocity = (x - denoised) / sigma - denoised
        z_euler = z + (t_next - t) * velocity
        if sigma_next == 0:  # t = 0: z = x̂0
            x = z_euler
            continue
        x_euler = z_euler * (1 + sigma_next)
        denoised_next = yield sigma_next, x_euler
        velocity_next = (x_euler - denoised_next) / sigma_next - denoised_next
        x = (z + (t_next - t) * (velocity + velocity_next) / 2) * (1 + sigma_next)
    return x


SOLVERS = {"euler": euler, "heun": heun, "midpoint": midpoint, "dpmpp-2m": dpmpp_multistep(2),
           "dpmpp-3m": dpmpp_multistep(3), "flow-heun": flow_heun}


@register("dpmpp-3m", family="ode", stochastic=False, defaults={"solver": "dpmpp-3m", "sigma_schedule": "log_snr"},
          description="DPM-Solver++ third-order multistep, uniform log-SNR steps")
@register("flow-heun", family="ode", stochastic=False, nfe_per_step=2,
          defaults={"solver": "flow-heun", "sigma_schedule": "flow"},
          description="Heun on the rectified-flow ODE, steps uniform in flow time t = σ/(1 + σ)")
@register("dpmpp-2m", family="ode", stochastic=False, defaults={"solver": "dpmpp-2m", "sigma_schedule": "log_snr"},
          description="DPM-Solver++(2M), uniform log-SNR steps (Lu et al. 2022)")
@register("midpoint", family="ode", stochastic=False, nfe_per_step=2, defaults={"solver": "midpoint"},
          description="probability-flow ODE, explicit midpoint in log σ")
@register("heun", family="ode", stochastic=False, nfe_per_step=2, defaults={"solver": "heun"},
          description="probability-flow ODE, Heun (EDM Alg. 1), Karras steps")
@register("euler", family="ode", stochastic=False, defaults={"solver": "euler"},
          description="probability-flow ODE, Euler in σ, Karras steps (EDM)")
class ProbabilityFlowScheduler(SigmaSpaceScheduler):
    """Fixed-step solvers of the probability-flow ODE for any model that maps to σ-space."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        solver: str = "heun",
        sigma_schedule: str = "karras",
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigma: str = "zero",
    ):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {tuple(SOLVERS)}")
        self._init_sigma_space()

    def solver(self, x, sigmas, noise):
        return SOLVERS[self.config.solver](x, sigmas, noise)


@register("rk45", family="ode", stochastic=False, nfe_per_step=0, adaptive=True,
          description="probability-flow ODE, adaptive Dormand–Prince RK45 (scipy), rtol = atol = 1e-3")
class AdaptiveODEScheduler(SigmaSpaceScheduler):
    """The probability-flow ODE solved by scipy's adaptive RK45 (Dormand & Prince 1980), as score_sde's
    ``get_ode_sampler``: the error controller, not a step count, decides where to evaluate, and ``nfe``
    reports what it spent. The solver calls the model itself, so it runs through ``solve(model_call, x)``
    — ``DiffusionImagePipeline`` does this — instead of diffusers' one-call-per-``step()`` protocol;
    ``num_inference_steps`` is ignored.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigma: str = "zero",
        sigma_schedule: str = "log_snr",
        rho: float = 7.0,
    ):
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
        self._init_sigma_space()
        self.nfe_spent = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None):
        low, high = self.sigma_range()
        self.sigmas = torch.tensor([high, low], dtype=torch.float64)
        self.init_noise_sigma = float((1 + self.sigmas[0] ** 2).sqrt())
        self.timesteps = torch.zeros(0, device=device)  # evaluation points are not known in advance

    def step(self, *args, **kwargs):
        raise ValueError("the adaptive RK45 sampler decides its own steps; run it through solve(model_call, x) "
                         "(DiffusionImagePipeline does), not through a per-step loop")

    def solve(self, model_call, x_ve: torch.Tensor) -> torch.Tensor:
        """Integrate dx/dσ = (x − D)/σ from σ_max to σ_min; ``model_call(x_model, t)`` is the network."""
        import numpy as np
        from scipy.integrate import solve_ivp

        from .sigma_base import denoise_with_vp_model

        low, high = float(self.sigmas[1]), float(self.sigmas[0])
        shape, dtype = x_ve.shape, x_ve.dtype
        self.nfe_spent = 0

        def denoise(x, sigma):
            self.nfe_spent += 1
            return denoise_with_vp_model(model_call, x, sigma, self.schedule, self.config.prediction_type)

        def drift(sigma, flat):
            x = torch.from_numpy(flat).reshape(shape).to(device=x_ve.device, dtype=dtype)
            return ((x - denoise(x, sigma)) / sigma).reshape(-1).double().cpu().numpy()

        solution = solve_ivp(drift, (high, low), x_ve.reshape(-1).double().cpu().numpy(), method="RK45",
                             rtol=self.config.rtol, atol=self.config.atol)
        if not solution.success:
            raise RuntimeError(f"the adaptive ODE solve failed: {solution.message}")
        x = torch.from_numpy(np.ascontiguousarray(solution.y[:, -1])).reshape(shape).to(x_ve.device, dtype)
        return denoise(x, low) if self.config.final_sigma == "zero" else x
