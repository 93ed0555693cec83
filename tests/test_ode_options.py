"""Options of the probability-flow ODE solvers: the multistep solvers' lower-order final step."""

import pytest
import torch

import schedulers

from .conftest import make_pipeline, seeded

pytestmark = pytest.mark.usefixtures("single_thread")


def run(mixture, steps, **config):
    scheduler = schedulers.ProbabilityFlowScheduler(sigma_schedule="log_snr", sigma_min=0.05, final_sigma="sigma_min",
                                                    **config)
    latents = torch.randn(64, 1, 4, 4, generator=seeded(0), dtype=torch.float64)
    return make_pipeline(mixture, scheduler)(batch_size=64, num_inference_steps=steps, latents=latents,
                                             output_type="raw").images


def test_lower_order_final_takes_a_ddim_last_step(mixture):
    """Two steps: the first has no history and the second is first order, so 2M is Euler (≡ DDIM) throughout."""
    euler = run(mixture, 3, solver="euler")
    assert torch.allclose(run(mixture, 3, solver="dpmpp-2m", lower_order_final=True), euler, atol=1e-10)
    assert not torch.allclose(run(mixture, 3, solver="dpmpp-2m"), euler, atol=1e-3)


def drive(mixture, solver, x, sigmas, lower_order_final):
    multistep = schedulers.ode.SOLVERS[solver]
    return schedulers.ode.drive_solver(lambda x, s, n: multistep(x, s, n, lower_order_final), mixture.denoise, x,
                                       sigmas)[0]


@pytest.mark.parametrize("solver", ["dpmpp-2m", "dpmpp-3m"])
def test_lower_order_final_changes_only_the_last_step(mixture, solver):
    """The run up to the last σ but one is the plain solver's; the last step is DDIM from there."""
    sigmas = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.1, 0.03], dtype=torch.float64)
    x = 80 * torch.randn(64, 16, generator=seeded(1), dtype=torch.float64)
    before_last = drive(mixture, solver, x, sigmas[:-1], False)
    ratio = sigmas[-1] / sigmas[-2]
    ddim = ratio * before_last + (1 - ratio) * mixture.denoise(before_last, float(sigmas[-2]))
    assert torch.allclose(drive(mixture, solver, x, sigmas, True), ddim, atol=1e-10)
    assert not torch.allclose(drive(mixture, solver, x, sigmas, False), ddim, atol=1e-4)


def test_lower_order_final_needs_a_multistep_solver():
    with pytest.raises(ValueError, match="lower_order_final"):
        schedulers.ProbabilityFlowScheduler(solver="heun", lower_order_final=True)


# ---------------------------------------------------------------- the mean-value (AMED-style) multistep solver

GRID = torch.tensor([80.0, 12.0, 2.0, 0.4, 0.08, 0.02], dtype=torch.float64)


def starts(seed, n=500):
    return GRID[0] * torch.randn(n, 16, generator=seeded(seed), dtype=torch.float64)


def solve(mixture, solver, x):
    return schedulers.ode.drive_solver(solver, mixture.denoise, x, GRID)[0]


def test_the_dpmpp_2m_mean_value_point_gives_dpmpp_2m(mixture):
    """κ = φ₂/(1 − e^{−h}) in mean_value_step is DPM-Solver++(2M) as written in ``dpmpp_multistep``."""
    h = torch.log(GRID[:-1] / GRID[1:])
    kappa = [0.0] + [float((torch.expm1(-step) / step + 1) / -torch.expm1(-step)) for step in h[1:]]
    x = starts(0, 64)
    two_m = solve(mixture, schedulers.ode.SOLVERS["dpmpp-2m"], x)
    assert torch.allclose(solve(mixture, schedulers.ode.mean_value_multistep(kappa), x), two_m, atol=1e-12)


def test_fitted_mean_value_points_beat_dpmpp_2m_on_fresh_noise(mixture):
    """Fitted on one batch of noise, judged on another against a tight solution, five steps: measured RMS error
    0.082 for the fitted table (κ = 0, 3.02, 0.85, 0.17, 0) against 0.113 for dpmpp-2m (0.73×)."""
    points = schedulers.ode.fit_mean_value_points(mixture.denoise, starts(1), GRID, weighting="euclidean")
    assert points[0] == 0.0 and points[-1] == 0.0  # no history on the first step; first order on the last
    x = starts(2)
    fine = torch.exp(torch.linspace(GRID[0].log(), GRID[-1].log(), 400, dtype=torch.float64))
    tight = schedulers.ode.drive_solver(schedulers.ode.SOLVERS["dpmpp-3m"], mixture.denoise, x, fine)[0]
    fitted = solve(mixture, schedulers.ode.mean_value_multistep(points), x)
    two_m = solve(mixture, schedulers.ode.SOLVERS["dpmpp-2m"], x)
    rms = {name: float(((y - tight) ** 2).mean().sqrt()) for name, y in (("fitted", fitted), ("2m", two_m))}
    assert rms["fitted"] <= 0.8 * rms["2m"]


def test_mean_value_scheduler_checks_its_table(mixture):
    with pytest.raises(ValueError, match="mean_value_points"):
        schedulers.ProbabilityFlowScheduler(solver="mean-value-2m")
    with pytest.raises(ValueError, match="mean_value_points"):
        schedulers.ProbabilityFlowScheduler(solver="dpmpp-2m", mean_value_points=[0.0, 0.5])
    scheduler = schedulers.get_sampler("dpmpp-2m-mv").create({}, mean_value_points=[0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="fit the table"):
        scheduler.set_timesteps(10)
    scheduler.set_timesteps(3)  # three grid points and the final denoise: three steps
    assert scheduler.nfe == 3
    ending_at_sigma_min = schedulers.get_sampler("dpmpp-2m-mv").create({}, mean_value_points=[0.0, 0.5, 0.5],
                                                                       final_sigma="sigma_min")
    assert ending_at_sigma_min.nfe == 3 and ending_at_sigma_min.sigmas[-1] > 0  # four points, no final denoise
    ending_at_sigma_min.set_timesteps(4)
    assert ending_at_sigma_min.nfe == 3


def test_the_precision_weighted_fit_is_closer_in_the_data_metric(mixture):
    """Weighted by the reference's inverse covariance, the fit trades Euclidean error for error in the thin
    directions: judged on fresh noise in the data's own Mahalanobis norm, it is the closer of the two (measured
    1.10 against 1.15; in Euclidean RMS 0.085 against 0.080)."""
    x = starts(2, 2000)
    fine = torch.exp(torch.linspace(GRID[0].log(), GRID[-1].log(), 400, dtype=torch.float64))
    tight = schedulers.ode.drive_solver(schedulers.ode.SOLVERS["dpmpp-3m"], mixture.denoise, x, fine)[0]
    precision = torch.linalg.inv(torch.cov(tight.T))
    errors = {}
    for weighting in schedulers.ode.WEIGHTINGS:
        points = schedulers.ode.fit_mean_value_points(mixture.denoise, starts(1), GRID, weighting=weighting)
        residual = solve(mixture, schedulers.ode.mean_value_multistep(points), x) - tight
        errors[weighting] = float((residual @ precision * residual).sum(1).mean().sqrt())
    assert errors["precision"] < errors["euclidean"]
    with pytest.raises(ValueError, match="more starts than dimensions"):
        schedulers.ode.fit_mean_value_points(mixture.denoise, starts(1, 16), GRID, weighting="precision")
    with pytest.raises(ValueError, match="weighting"):
        schedulers.ode.fit_mean_value_points(mixture.denoise, starts(1), GRID, weighting="mahalanobis")
