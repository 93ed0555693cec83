"""PFGM++ and PFGM: the kernel and its prior against their closed forms, the EDM preconditioning, the backward
ODE driven by the exact posterior mean of a point set, the Poisson field against brute force, the D = 1 ↔ PFGM
link trajectory by trajectory, and a tiny PFGM++ training run exported and sampled through the pipeline."""

import math

import pytest
import torch
from scipy import stats

import schedulers
from pipelines import DiffusionImagePipeline
from schedulers.pfgm import (
    PFGMppScheduler,
    PointSetDenoiser,
    normalized_field_target,
    pfgm_ode,
    pfgm_prior,
    pfgm_sample,
    pfgmpp_log_kernel,
    pfgmpp_noise,
    point_set_posterior_mean,
    poisson_field,
)
from schedulers.processes import EDMProcess
from train import diffusion
from train.objectives import EDMObjective, PFGMppObjective, make_objective

from .conftest import seeded

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (1, 4, 4)  # N = 16
N = 16


@pytest.fixture(scope="module")
def points():
    """Five well-separated points in [−1, 1]^16: the "data set" whose posterior mean is exact."""
    return torch.rand(5, *SHAPE, generator=seeded(4), dtype=torch.float64) * 2 - 1


def _radius_fraction(x, r):
    """B = R²/(R² + r²), which is Beta(N/2, D/2) under the PFGM++ kernel."""
    radius_sq = x.reshape(len(x), -1).double().pow(2).sum(1)
    return radius_sq / (radius_sq + r**2)


@pytest.mark.parametrize("D", [1, 16, 128])
def test_prior_radius_follows_its_closed_form(D):
    scheduler = PFGMppScheduler(pfgm_D=D)
    scheduler.set_timesteps(10)
    prior = scheduler.sample_prior((4000, *SHAPE), generator=seeded(0))
    fraction = _radius_fraction(prior, 80.0 * math.sqrt(D)).numpy()
    assert stats.kstest(fraction, stats.beta(N / 2, D / 2).cdf).pvalue > 0.01
    # the test can fail: the same samples reject the prior of twice as many extra dimensions
    assert stats.kstest(fraction, stats.beta(N / 2, D).cdf).pvalue < 1e-6
    directions = prior.reshape(len(prior), -1) / prior.reshape(len(prior), -1).norm(dim=1, keepdim=True)
    assert directions.mean(0).abs().max() < 4 / math.sqrt(len(prior))  # uniform on the sphere: mean 0


def test_kernel_is_normalized_and_tends_to_the_gaussian_as_D_grows():
    # ∫ p(‖δ‖) S_N ρ^{N−1} dρ = 1 for the closed form (N = 3, D = 2: tails ∝ ρ^{−3})
    rho = torch.linspace(0, 4000, 2_000_001, dtype=torch.float64)
    density = pfgmpp_log_kernel(rho**2, 0.7, 3, 2).exp() * 4 * math.pi * rho**2
    assert torch.trapezoid(density, rho).item() == pytest.approx(1.0, abs=2e-3)
    # at typical Gaussian distances the log densities converge, and noise radii with them
    sigma = 0.8
    distance_sq = (sigma * torch.randn(2000, N, generator=seeded(1), dtype=torch.float64)).pow(2).sum(1)
    gaussian = pfgmpp_log_kernel(distance_sq, sigma, N, None)
    gaps = [(pfgmpp_log_kernel(distance_sq, sigma, N, D) - gaussian).abs().max().item() for D in (16, 128, 2048, 10**5)]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-2 < gaps[0]
    medians = [pfgmpp_noise((2000, N), sigma, D, seeded(2)).norm(dim=1).median().item() for D in (16, 10**4, None)]
    assert abs(medians[1] / medians[2] - 1) < 0.01 < abs(medians[0] / medians[2] - 1)


def test_edm_process_decodes_the_training_target_and_inverts_its_time_map():
    adapter = EDMProcess()
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0], dtype=torch.float64)
    assert torch.allclose(adapter.timestep(sigma[[0, 3]]), torch.tensor([0.0, 1000.0], dtype=torch.float64))
    assert torch.allclose(adapter.sigma_of_timestep(adapter.timestep(sigma)), sigma)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    x = x0 + sigma[:, None] * torch.randn(4, 3, dtype=torch.float64)
    skip, out = adapter.skip_and_out(sigma[:, None])
    assert torch.allclose(adapter.denoised((x0 - skip * x) / out, x, sigma[:, None]), x0)
    with pytest.raises(ValueError, match="prediction_type 'edm'"):
        EDMProcess("epsilon")


@pytest.mark.parametrize("objective", [PFGMppObjective(pfgm_D=64, null_class_id=3), EDMObjective(null_class_id=3)])
def test_objective_builds_the_preconditioned_batch(objective):
    x0 = torch.rand(256, *SHAPE, generator=seeded(5)) * 2 - 1
    batch = objective.sample(x0, torch.arange(256) % 3, seeded(6))
    adapter = EDMProcess()
    sigma = adapter.sigma_of_timestep(batch.model_kwargs["timestep"].double())
    assert 0.2 < sigma.median() < 0.4  # exp(P_mean) = 0.30
    x = batch.noisy.double() / adapter.input_scale(sigma)[:, None, None, None]
    assert torch.allclose(adapter.denoised(batch.target.double(), x, sigma[:, None, None, None]), x0.double(),
                          atol=1e-4)
    fraction = _radius_fraction(x - x0.double(), sigma * math.sqrt(64)).numpy()
    if objective.pfgm_D is not None:  # x − x0 follows the D = 64 kernel at r = σ√D
        assert stats.kstest(fraction, stats.beta(N / 2, 32).cdf).pvalue > 0.01
    assert torch.all(batch.loss_weight == 1)


@pytest.mark.parametrize("D", [1, 128, None])
def test_backward_ode_carries_prior_samples_onto_the_points(points, D):
    model = PointSetDenoiser.from_points(points, pfgm_D=D)
    sampler = "pfgmpp-heun" if D is not None else "heun"
    scheduler = schedulers.get_sampler(sampler).create({"prediction_type": "edm", "model_process": "edm",
                                                        "pfgm_D": D, "sigma_min": 0.002, "sigma_max": 80.0})
    pipe = DiffusionImagePipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(batch_size=200, num_inference_steps=40, generator=seeded(7), output_type="raw").images.double()
    distances = torch.cdist(samples.reshape(200, -1), points.reshape(5, -1))
    # D = 1's prior has a Cauchy-like tail: one of these starts sits at R = 94,000 ≫ σ_max, and its trajectory
    # reaches the points' scale only at σ ≈ 0.003, too late to pick one (why PFGM clips its prior radius)
    assert (distances.min(dim=1).values < 1e-2).float().mean() >= (0.99 if D == 1 else 1.0)
    hits = torch.bincount(distances.argmin(dim=1), minlength=5)
    assert hits.min() >= 10  # every point is reached, none dominates (expected 40 each)


def _brute_force_field(x, z, data):
    """The field as the formula reads, one charge at a time (float64)."""
    n, dim = len(data), x[0].numel() + 1
    area = 2 * math.pi ** (dim / 2) / math.gamma(dim / 2)
    fields = []
    for xi in x.reshape(len(x), -1):
        total = torch.zeros(dim, dtype=torch.float64)
        for y in data.reshape(n, -1):
            diff = torch.cat([xi - y, torch.tensor([z], dtype=torch.float64)])
            total += diff / (area * diff.norm() ** dim) / n
        fields.append(total)
    return torch.stack(fields)


def test_empirical_poisson_field_agrees_with_brute_force():
    data = torch.randn(7, 1, 2, 3, generator=seeded(8), dtype=torch.float64)
    x = torch.randn(5, 1, 2, 3, generator=seeded(9), dtype=torch.float64)
    field = poisson_field(x, 0.4, data)
    brute = _brute_force_field(x, 0.4, data)
    assert torch.allclose(field, brute, rtol=1e-10)
    target = normalized_field_target(x, 0.4, data, gamma=5.0)
    assert torch.allclose(target / target.norm(dim=1, keepdim=True), -brute / brute.norm(dim=1, keepdim=True))
    norms = target.norm(dim=1)
    assert torch.all(norms < math.sqrt(6)) and torch.all(norms > 0)


def test_pfgm_prior_is_the_D_1_prior():
    prior = pfgm_prior(4000, SHAPE, 40.0, seeded(10))
    assert stats.kstest(_radius_fraction(prior, 40.0).numpy(), stats.beta(N / 2, 0.5).cdf).pvalue > 0.01


def test_pfgm_log_z_ode_is_the_pfgmpp_sigma_ode_with_D_1(points):
    # the drifts agree pointwise: z E_x/E_z from the field = x − E[y | x] under the D = 1 kernel at r = z
    x = torch.randn(6, *SHAPE, generator=seeded(11), dtype=torch.float64) * 3
    for z in (0.05, 1.0, 30.0):
        field = poisson_field(x, z, points)
        assert torch.allclose(z * field[:, :-1] / field[:, -1:],
                              (x - point_set_posterior_mean(points, x, z, 1)).reshape(6, -1), rtol=1e-9, atol=1e-12)
    # and so do the trajectories: PFGM's RK4 in log z vs PFGM++'s Heun in σ, from the same prior samples
    start = pfgm_prior(32, SHAPE, 40.0, seeded(12))
    pfgm_end = pfgm_ode(points, start, 40.0, 0.05, steps=400)
    scheduler = PFGMppScheduler(pfgm_D=1, sigma_min=0.05, sigma_max=40.0, final_sigma="sigma_min")
    scheduler.set_timesteps(400)
    model = PointSetDenoiser.from_points(points, pfgm_D=1)
    sample = start.clone()
    for t in scheduler.timesteps:
        output = model(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(output, t, sample).prev_sample
    assert (sample - pfgm_end).abs().max() < 1e-3


def test_pfgm_demo_lands_on_the_data(points):
    samples = pfgm_sample(points, 16, steps=100, seed=1)  # prior radii 56 … 7,614 at z_max = 40
    assert torch.cdist(samples.reshape(16, -1), points.reshape(5, -1)).min(dim=1).values.max() < 1e-2


def test_registry_offers_pfgmpp_samplers_only_to_pfgmpp_models_and_ode_samplers_to_edm():
    assert schedulers.samplers_for("pfgmpp") == ["pfgmpp-heun", "pfgmpp-euler"]
    edm = set(schedulers.samplers_for("edm"))
    assert {"euler", "heun", "dpmpp-2m", "rk45"} <= edm
    assert not edm & {"ddim", "ddpm", "sde-pc", "sde-euler-maruyama", "pfgmpp-heun"}
    assert not {"pfgmpp-heun", "pfgmpp-euler"} & set(schedulers.samplers_for("vp"))
    made = schedulers.get_sampler("pfgmpp-euler").create({"pfgm_D": 7, "model_process": "edm",
                                                          "prediction_type": "edm", "clip_sample": False})
    assert (made.config.pfgm_D, made.config.solver) == (7, "euler")


@pytest.mark.parametrize("kwargs, message", [({"pfgm_D": 0}, "positive integer"), ({"pfgm_D": 2.5}, "positive"),
                                             ({"solver": "rk4"}, "unknown solver")])
def test_bad_settings_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PFGMppScheduler(**kwargs)


def test_the_prior_sits_at_the_current_grids_sigma_max_from_construction_on():
    scheduler = PFGMppScheduler(pfgm_D=None)  # D = ∞: x_T = σ_max g, a grid laid out at construction (issue #18)
    for _ in range(2):
        prior = scheduler.sample_prior((1, *SHAPE), generator=seeded(0), dtype=torch.float64)
        expected = scheduler.sigmas[0] * torch.randn((1, *SHAPE), generator=seeded(0), dtype=torch.float64)
        torch.testing.assert_close(prior, expected)
        scheduler.set_timesteps(sigmas=[5.0, 1.0])
    with pytest.raises(ValueError, match="timestep-sampling"):
        make_objective("pfgmpp", timestep_sampling="importance")


@pytest.mark.parametrize("objective, scheduler_class", [("pfgmpp", "PFGMppScheduler"),
                                                        ("edm", "ProbabilityFlowScheduler")])
def test_trained_model_exports_a_pipeline_that_samples_from_its_prior(tmp_path, objective, scheduler_class):
    diffusion.main(["--objective", objective, "--D", "32", "--model", "tiny", "--image-size", "16",
                    "--max-train-images", "32", "--steps", "3", "--batch-size", "8", "--warmup", "1",
                    "--sample-every", "0", "--output-dir", str(tmp_path / "run"), "--export", str(tmp_path / "model")])
    pipe = DiffusionImagePipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    info = pipe.config.model_info
    assert type(pipe.scheduler).__name__ == scheduler_class and info["process"] == objective
    assert info.get("pfgm_D") == (32 if objective == "pfgmpp" else None)
    out = pipe(batch_size=4, num_inference_steps=3, class_labels=[0, 1, 2, 3], guidance_scale=2.0,
               generator=seeded(0), output_type="raw")
    assert out.images.shape == (4, 1, 16, 16) and torch.isfinite(out.images).all() and out.nfe == 2 * 5
