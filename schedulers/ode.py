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

from .processes import VPProcess, takes_process_config
from .processes.flow import flow_time
from .registry import register
from .sigma_base import SIGMA_SPACE_DEFAULTS, SigmaSpaceScheduler


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
    1 NFE per step otherwise. ``warm_up=False`` (a run started mid-grid, whose evaluation points the grid fixed)
    starts with first order instead, as diffusers' multistep solvers restart.

    ``lower_order_final``: take the last step with first order (DDIM), as diffusers does below 15 steps
    (Lu et al. 2022b, §3.3: the multistep extrapolation of D is least reliable over the last, stiffest step).
    On thin data the extrapolated D overshoots there and spreads samples across the thin directions: on the
    benchmark's 64-d tuning mixture at NFE 5 (Karras ρ = 7 down to σ_min = 0.01, 300 samples) the NLL gap of 2M
    drops from +2,700 to +0.35 nats with it (docs/samplers.md).
    """

    def solve(x, sigmas, noise, lower_order_final: bool = False, warm_up: bool = True):
        history = []  # (denoised, h) of the previous steps, newest first
        last = len(sigmas) - 2
        for step, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
            denoised = yield sigma, x
            if sigma_next == 0:
                x = denoised
                continue
            h = torch.log(sigma / sigma_next)
            if lower_order_final and step == last:
                x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised
                continue
            if order >= 3 and not history and warm_up:
                sigma_mid = (sigma * sigma_next).sqrt()
                x_mid = (sigma_mid / sigma) * x - torch.expm1(-h / 2) * denoised
                denoised_mid = yield sigma_mid, x_mid
                x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_mid
                history = [(denoised, h)]
                continue
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised
            x = x + multistep_increment(denoised, history[:order - 1], h)
            history = [(denoised, h), *history][:2]
        return x

    return solve


def multistep_increment(denoised, history, h, h_phi=None, curvature_weight: float = 2.0):
    """The φ-terms that DPM-Solver++ multistep adds to the first-order step: φ₂ d₁ from one previous value,
    φ₂ (d₁⁰ + r₀ c) − 2 φ₃ c from two (``dpmpp_multistep``'s docstring), 0 from none.

    ``history``: (D, h) of the previous steps, newest first; their step sizes and ``h`` set the divided differences
    in λ. ``h_phi`` (default ``h``) is the step the φ-functions are taken over: the SDE's (1 + η) h, over which its
    exact linear part decays (``sde.dpmpp_3m_sde``). ``curvature_weight``: the 2 of −2 φ₃ c (k-diffusion and
    diffusers use 1)."""
    h_phi = h if h_phi is None else h_phi
    phi_2 = torch.expm1(-h_phi) / h_phi + 1
    if len(history) >= 2:
        (d1, h1), (d2, h2) = history[:2]
        r0, r1 = h1 / h, h2 / h
        slope_0 = (denoised - d1) / r0
        slope_1 = (d1 - d2) / r1
        curvature = (slope_0 - slope_1) / (r0 + r1)
        phi_3 = phi_2 / h_phi - 0.5
        return phi_2 * (slope_0 + curvature * r0) - curvature_weight * phi_3 * curvature
    if history:
        d1, h1 = history[0]
        return phi_2 * (denoised - d1) / (h1 / h)
    return torch.zeros_like(denoised)


def mean_value_step(x, denoised, previous, sigma, sigma_next):
    """A multistep step split as ``base + κ · direction``: the mean value theorem's view of it (Su part 21).

    Exactly, x' = (σ'/σ) x + (1 − σ'/σ) D̄, with D̄ the e^λ-weighted mean of D over the step, and D̄ = D(x(s), s)
    at some s by the mean value theorem. Extrapolating D linearly in λ from the previous step puts that point at
    D̄ ≈ D + κ (D − D₋₁) h/h₋₁: κ = 0 is DDIM, κ = ½ diffusers' DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2),
    κ = φ₂/(1 − e^{−h}) ``dpmpp-2m``. Returns base = (σ'/σ) x + (1 − σ'/σ) D and direction = (1 − σ'/σ)(D − D₋₁)
    h/h₋₁, or D − D₋₁ onto σ' = 0; ``previous`` is (D₋₁, h₋₁), or None on the first step (direction 0).
    """
    ratio = sigma_next / sigma
    base = ratio * x + (1 - ratio) * denoised
    if previous is None:
        return base, torch.zeros_like(x)
    d1, h1 = previous
    scale = torch.log(sigma / sigma_next) / h1 if sigma_next > 0 else 1.0
    return base, (1 - ratio) * (denoised - d1) * scale


def mean_value_multistep(points):
    """Two-step multistep solver whose mean-value point κ_n comes from a table, one per step: AMED-Solver's
    per-step intermediate time (Zhou et al. 2024; Su part 21), here fitted by ``fit_mean_value_points`` rather
    than predicted by a network. 1 NFE per step; the table fixes the number of steps."""

    def solve(x, sigmas, noise):
        if len(points) != len(sigmas) - 1:
            raise ValueError(f"mean_value_points holds {len(points)} values, but the grid has {len(sigmas) - 1} "
                             "steps: fit the table for the grid you sample with")
        previous = None
        for kappa, (sigma, sigma_next) in zip(points, _pairs(sigmas)):
            denoised = yield sigma, x
            base, direction = mean_value_step(x, denoised, previous, sigma, sigma_next)
            x = base + kappa * direction
            previous = (denoised, torch.log(sigma / sigma_next)) if sigma_next > 0 else None
        return x

    return solve


def drive_solver(solver, denoise, x, sigmas):
    """Run a solver generator with ``denoise(x, σ)`` outside a scheduler (fitting, tests, references); returns
    the final x and every (σ, x) it asked about."""
    run, asked = solver(x, sigmas, None), []
    sigma, x = next(run)
    try:
        while True:
            asked.append((float(sigma), x))
            sigma, x = run.send(denoise(x, sigma))
    except StopIteration as finished:
        return finished.value, asked


WEIGHTINGS = ("euclidean", "precision")


def least_squares_metric(target: torch.Tensor, weighting: str) -> torch.Tensor:
    """The metric of ``fit_mean_value_points``' least squares at one σ: the identity for the Euclidean norm,
    else the inverse of the reference states' covariance (ridge 1e-6 of its mean variance, for the rank it lacks)."""
    flat = target.flatten(1)
    if weighting == "euclidean":
        return torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
    covariance = torch.cov(flat.T)
    ridge = 1e-6 * covariance.diagonal().mean() * torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
    return torch.linalg.inv(covariance + ridge)


def fit_mean_value_points(denoise, x, sigmas, substeps: int = 30, lower_order_final: bool = True,
                          weighting: str = "euclidean") -> list[float]:
    """AMED's distillation (Zhou et al. 2024) without the network: for each step in turn, the κ of
    ``mean_value_step`` that brings the solver's x' closest to a tight solution from the same start, in closed
    form κ = ⟨x_ref − base, direction⟩_M/‖direction‖²_M (least squares over the batch). The solver goes on from its
    own x', as AMED trains along its own trajectory.

    ``weighting`` picks the metric M. ``"euclidean"`` (M = I) fits the wide directions, which dominate the
    error. ``"precision"`` is the inverse covariance of the reference states at the step's end (a Mahalanobis
    norm): the directions in which the data are thin, where a sample's likelihood is decided, count as much as the
    wide ones. It needs more samples in ``x`` than dimensions. Neither is better everywhere: on the sampler
    benchmark's 64-d mixture at NFE 5 (grid searched on another mixture) the precision fit leaves an NLL gap of
    −0.5 nats where the Euclidean fit leaves −3.7, at equal mode placement; on the tests' 16-d mixture with a fixed
    grid it moves the NLL gap further from the tight solution's (docs/samplers.md).

    ``denoise(x, σ)`` is the model's D; ``x`` a batch of starts at ``sigmas[0]`` (scaled noise); ``sigmas`` the
    grid to sample with (ending at 0 or not). The reference is ``dpmpp-3m`` with ``substeps`` log-σ steps per
    step (a step onto σ = 0 ends at 1e-4 of its start instead). ``lower_order_final`` fixes the last κ at 0:
    extrapolating D over the last, stiffest step overshoots in the thin directions.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    if weighting == "precision" and len(x) <= x[0].numel():
        raise ValueError(f"the precision-weighted fit needs more starts than dimensions ({x[0].numel()}); got "
                         f"{len(x)}: pass more, or weighting='euclidean'")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    points, _ = fit_mean_value_points_to(_tight_states(denoise, x, sigmas, substeps), denoise, x, sigmas,
                                         lower_order_final, weighting)
    return points


def _tight_states(denoise, x, sigmas, substeps: int) -> list[torch.Tensor]:
    """``dpmpp-3m`` with ``substeps`` log-σ steps per step of ``sigmas`` from ``x``: its states at ``sigmas[1:]`` (a
    step onto σ = 0 ends at 1e-4 of its start, whose state stands for the last)."""
    segments = []
    for sigma, sigma_next in _pairs(sigmas):
        end = sigma_next if sigma_next > 0 else sigma * 1e-4
        segment = torch.exp(torch.linspace(float(torch.log(sigma)), float(torch.log(end)), substeps + 1,
                                           dtype=torch.float64))
        segment[0] = sigma  # the grid's own σ, exactly, so the reference can be read off there
        segments.append(segment[:-1])
    fine = torch.cat([*segments, end.reshape(1)])
    final, asked = drive_solver(dpmpp_multistep(3), denoise, x, fine)
    on_fine = dict(asked)
    return [on_fine[float(sigma)] for sigma in sigmas[1:-1]] + [final]


def fit_mean_value_points_to(targets, denoise, x, sigmas, lower_order_final: bool = True, weighting: str = "euclidean",
                             within_step: bool = False) -> tuple[list[float], torch.Tensor]:
    """``fit_mean_value_points``' greedy least squares against given ``targets`` (the tight solution's states at
    ``sigmas[1:]``): the table, and where the solver with it ends. One evaluation of ``denoise`` per step.

    ``within_step``: keep each κ in [0, 1], where the mean value theorem puts the point (``mean_value_step``: κ is
    its place in the step, in λ); the clamped value is the constrained least-squares solution (one variable)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    points, previous = [], None
    for step, ((sigma, sigma_next), target) in enumerate(zip(_pairs(sigmas), targets)):
        denoised = denoise(x, sigma)
        base, direction = mean_value_step(x, denoised, previous, sigma, sigma_next)
        metric = least_squares_metric(target, weighting)
        residual, along = (target - base).flatten(1), direction.flatten(1)
        norm = float((along @ metric * along).sum())
        last = step == len(sigmas) - 2
        kappa = 0.0 if norm == 0 or (lower_order_final and last) else float((residual @ metric * along).sum()) / norm
        kappa = min(max(kappa, 0.0), 1.0) if within_step else kappa
        x = base + kappa * direction
        points.append(kappa)
        previous = (denoised, torch.log(sigma / sigma_next)) if sigma_next > 0 else None
    return points, x


def flow_heun(x, sigmas, noise):
    """Heun on the rectified-flow ODE dz/dt = u = ε̂ − x̂0 (Liu et al. 2022; Su part 17): the same model, seen
    in flow coordinates z = x/(1 + σ), t = σ/(1 + σ), where x = x0 + σ ε becomes z = (1 − t) x0 + t ε. Euler
    in these coordinates holds (x̂0, ε̂) fixed and is DDIM again; Heun is not, its correction follows u."""
    for sigma, sigma_next in _pairs(sigmas):
        denoised = yield sigma, x
        t, t_next = flow_time(sigma), flow_time(sigma_next)
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
MULTISTEP = ("dpmpp-2m", "dpmpp-3m")
MEAN_VALUE = "mean-value-2m"  # needs its table, so it is built per scheduler rather than listed in SOLVERS


@register("dpmpp-2m-mv", family="ode", stochastic=False, requires=("mean_value_points",),
          defaults={"solver": MEAN_VALUE, "sigma_schedule": "log_snr"},
          description="2M with a fitted mean-value point per step (AMED-style; fit_mean_value_points for the grid)",
          deliberate={"inference_steps": "its fitted mean_value_points table fixes the step count: another count is "
                                         "a ValueError saying to fit the table for that grid"})
@register("dpmpp-3m", family="ode", stochastic=False, defaults={"solver": "dpmpp-3m", "sigma_schedule": "log_snr"},
          description="DPM-Solver++ third-order multistep, uniform log-SNR steps")
@register("flow-heun", family="ode", stochastic=False,
          defaults={"solver": "flow-heun", "sigma_schedule": "flow"},
          description="Heun on the rectified-flow ODE, steps uniform in flow time t = σ/(1 + σ)")
@register("dpmpp-2m", family="ode", stochastic=False, defaults={"solver": "dpmpp-2m", "sigma_schedule": "log_snr"},
          description="DPM-Solver++(2M), uniform log-SNR steps (Lu et al. 2022)")
@register("midpoint", family="ode", stochastic=False, defaults={"solver": "midpoint"},
          description="probability-flow ODE, explicit midpoint in log σ")
@register("heun", family="ode", stochastic=False, defaults={"solver": "heun"},
          description="probability-flow ODE, Heun (EDM Alg. 1), Karras steps")
@register("euler", family="ode", stochastic=False, defaults={"solver": "euler"},
          description="probability-flow ODE, Euler in σ, Karras steps (EDM)")
class ProbabilityFlowScheduler(SigmaSpaceScheduler):
    """Fixed-step solvers of the probability-flow ODE for any model that maps to σ-space."""

    @register_to_config
    @takes_process_config({**VPProcess.config_defaults, **SIGMA_SPACE_DEFAULTS})
    def __init__(
        self,
        solver: str = "heun",
        lower_order_final: bool = False,
        mean_value_points: list[float] | None = None,
    ):
        if solver not in SOLVERS and solver != MEAN_VALUE:
            raise ValueError(f"unknown solver {solver!r}; choose one of {(*SOLVERS, MEAN_VALUE)}")
        if lower_order_final and solver not in MULTISTEP:
            raise ValueError(f"lower_order_final applies to the multistep solvers {MULTISTEP}, not {solver!r}")
        if (solver == MEAN_VALUE) != (mean_value_points is not None):
            raise ValueError(f"mean_value_points goes with solver={MEAN_VALUE!r} and that solver needs it "
                             "(schedulers.ode.fit_mean_value_points fits one for a grid)")
        self._init_sigma_space()

    def default_inference_steps(self) -> int:
        """The fitted table's steps for the mean-value solver on a schedule (``num_inference_steps`` counts the grid's
        points, so a run that ends at σ_min instead of 0 takes one more for as many steps), else the base's."""
        if self.config.solver == MEAN_VALUE and self.config.tuned_sigmas is None:
            return len(self.config.mean_value_points) + (self.config.final_sigma == "sigma_min")
        return super().default_inference_steps()

    def solver(self, x, sigmas, noise, start=0):
        if self.config.solver == MEAN_VALUE:
            return mean_value_multistep(self.config.mean_value_points[start:])(x, sigmas, noise)
        if self.config.solver in MULTISTEP:
            return SOLVERS[self.config.solver](x, sigmas, noise, self.config.lower_order_final, start == 0)
        return SOLVERS[self.config.solver](x, sigmas, noise)


@register("rk45", family="ode", stochastic=False, adaptive=True, knobs={"rtol": 1e-3, "atol": 1e-3},
          description="probability-flow ODE, adaptive Dormand–Prince RK45 (scipy), rtol = atol = 1e-3",
          deliberate=dict.fromkeys(("save_load_gives_equal_steps", "step_shape", "outputs_equivalence",
                                    "add_noise_batch_of_grid_timesteps", "set_timesteps_takes_own_grid",
                                    "set_timesteps_device", "set_timesteps_rejects_a_grid_out_of_order",
                                    "seeded_full_loop", "exact_run_from_any_grid_point", "inference_steps"),
                                   "adaptive: its error controller picks the evaluation points while it solves, so it "
                                   "has no timestep grid and the per-step protocol raises a ValueError naming solve()"))
class AdaptiveODEScheduler(SigmaSpaceScheduler):
    """The probability-flow ODE solved by scipy's adaptive RK45 (Dormand & Prince 1980), as score_sde's
    ``get_ode_sampler``: the error controller, not a step count, decides where to evaluate, and ``nfe``
    reports what it spent. The solver calls the model itself, so it runs through ``solve(model_call, x)``
    — ``DiffusionImagePipeline`` does this — instead of diffusers' one-call-per-``step()`` protocol;
    ``num_inference_steps`` is ignored.
    """

    @register_to_config
    @takes_process_config({**VPProcess.config_defaults, **SIGMA_SPACE_DEFAULTS})
    def __init__(
        self,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        sigma_schedule: str = "log_snr",
    ):
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
        self._init_sigma_space()
        self.nfe_spent = 0

    LOOP_ERROR = ("the adaptive RK45 sampler decides its own steps while it solves; run it through "
                  "solve(model_call, x) (DiffusionImagePipeline does), not through a fixed-step loop over timesteps")

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """The integration range (σ_max, σ_min); ``num_inference_steps`` is ignored, and a grid cannot be given.
        ``timesteps`` holds only the start: a fixed-step loop over it fails at its first ``step``, naming ``solve``,
        instead of looping over nothing and returning the initial noise."""
        if timesteps is not None or sigmas is not None:
            raise ValueError(self.LOOP_ERROR)
        low, high = self.sigma_range()
        self.sigmas = torch.tensor([high, low], dtype=torch.float64)
        self.evaluation_sigmas = self.sigmas[:1]
        self.timesteps = self.process.timestep(self.evaluation_sigmas).to(torch.float32).to(device)
        self.init_noise_sigma = float((1 + self.sigmas[0] ** 2).sqrt())
        self._reset_run()

    @property
    def nfe(self) -> int:
        """The evaluations the last ``solve`` spent: not known before."""
        return self.nfe_spent

    def solver(self, x, sigmas, noise, start=0):
        raise ValueError(self.LOOP_ERROR)

    def step(self, *args, **kwargs):
        raise ValueError(self.LOOP_ERROR)

    def solve(self, model_call, x_ve: torch.Tensor) -> torch.Tensor:
        """Integrate dx/dσ = (x − D)/σ from σ_max to σ_min; ``model_call(x_model, t)`` is the network."""
        import numpy as np
        from scipy.integrate import solve_ivp

        low, high = float(self.sigmas[1]), float(self.sigmas[0])
        shape, dtype = x_ve.shape, x_ve.dtype
        self.nfe_spent = 0

        def denoise(x, sigma):
            self.nfe_spent += 1
            return self.denoise_with(model_call, x, sigma)

        def drift(sigma, flat):
            x = torch.from_numpy(flat).reshape(shape).to(device=x_ve.device, dtype=dtype)
            return ((x - denoise(x, sigma)) / sigma).reshape(-1).double().cpu().numpy()

        solution = solve_ivp(drift, (high, low), x_ve.reshape(-1).double().cpu().numpy(), method="RK45",
                             rtol=self.config.rtol, atol=self.config.atol)
        if not solution.success:
            raise RuntimeError(f"the adaptive ODE solve failed: {solution.message}")
        x = torch.from_numpy(np.ascontiguousarray(solution.y[:, -1])).reshape(shape).to(x_ve.device, dtype)
        return denoise(x, low) if self.config.final_sigma == "zero" else x
