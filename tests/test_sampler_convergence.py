"""Every registered sampler, driven by the exact score, converges to the true mixture as steps grow.

Distances: sliced W2 (mode placement and spread) against a fixed set of true samples, the total variation
of the per-mode weights, and the NLL gap (mean −log p of samples minus that of true samples: negative when
over-concentrated). Everything is seeded, so each number is deterministic; thresholds sit above the
measured values with margin (see each constant). The finite-sample floor of sliced W2 for 2,000 vs 2,000
true samples on this mixture is 0.030–0.060 over seeds.
"""

import pytest
import torch

import schedulers
from evaluation.distances import mode_weight_error, nll_gap, sliced_wasserstein
from evaluation.exact import ExactScoreModel, GaussianMixture
from schedulers.analytic import estimate_eps_second_moment

from .conftest import make_pipeline, seeded

pytestmark = pytest.mark.usefixtures("single_thread")

N = 2000
SW2_CONVERGED = 0.065  # at 1000 steps, measured 0.027 … 0.054 (sde-pc); the floor itself spans 0.030–0.060
MODE_TV_CONVERGED = 0.035  # measured 0.012–0.03; true-sample floor 0.003–0.034
NLL_GAP_CONVERGED = 2.5  # |gap| measured 0.03 (ddpm-large) … 1.84 (ddim-beta); σ_min = 0.01 of the chain caps it
FEW_STEPS = 4
FEW_STEP_RATIO = 1.5  # sliced W2 at 4 steps / at 1000 steps: every sampler is far off at 4 steps


@pytest.fixture(scope="module")
def reference(mixture):
    return mixture.sample(N, seeded(123))


@pytest.fixture(scope="module")
def model_config(mixture):
    """What a model supplies to the samplers that need it: Analytic-DPM's E‖ε̂‖²/d table."""
    model = ExactScoreModel.from_mixture(mixture)
    table = estimate_eps_second_moment(model, model.schedule, mixture.sample(4000, seeded(11)).float(), "epsilon",
                                       num_timesteps=100, batch_size=400, generator=seeded(0))
    return {"clip_sample": False, "eps_second_moment": table}


def generate(mixture, sampler, steps, seed=0, model_config=None, **overrides):
    scheduler = schedulers.get_sampler(sampler).create(model_config or {"clip_sample": False}, **overrides)
    return make_pipeline(mixture, scheduler)(batch_size=N, num_inference_steps=steps, generator=seeded(seed),
                                             output_type="raw").images


# dpmpp-2m-mv carries a table fitted for one grid and step count: tests/test_ode_options.py covers it. The
# consistency sampler needs a consistency model, not an ordinary denoiser: tests/test_consistency.py covers it.
NEEDS_A_SPECIAL_MODEL = {"mean_value_points", "consistency_objective"}


@pytest.mark.parametrize("sampler", [name for name in schedulers.samplers_for("vp")
                                     if not NEEDS_A_SPECIAL_MODEL & set(schedulers.get_sampler(name).requires)])
def test_every_sampler_converges_to_the_mixture(mixture, reference, model_config, sampler):
    converged = generate(mixture, sampler, 1000, model_config=model_config)
    few_steps = generate(mixture, sampler, FEW_STEPS, model_config=model_config)
    sw_converged = sliced_wasserstein(converged, reference)
    assert sw_converged <= SW2_CONVERGED
    assert mode_weight_error(mixture, converged) <= MODE_TV_CONVERGED
    assert abs(nll_gap(mixture, converged, reference)) <= NLL_GAP_CONVERGED
    if not schedulers.get_sampler(sampler).adaptive:  # an adaptive solver ignores the step count
        assert sliced_wasserstein(few_steps, reference) >= FEW_STEP_RATIO * sw_converged


def test_ddim_eta_one_is_ddpm(mixture):
    """Spec §6.2: DDIM with η = 1 and stride 1 is the DDPM sampler with σ_t = β̄_{t−1}β_t/β̄_t, step for step."""
    for steps in [1000, 37]:
        ddpm = generate(mixture, "ddpm", steps, seed=5)
        ddim = generate(mixture, "ddim-eta1", steps, seed=5)
        assert (ddpm - ddim).abs().max() <= 1e-4


def test_deterministic_ddim_converges_at_first_order():
    """η = 0 is Euler on the probability-flow ODE: against 1000 steps the endpoint error halves as steps double.

    On a smooth mixture (τ² = 0.1); the thin one above needs far more steps to reach the asymptotic regime.
    Measured slopes: 0.90, 0.94, 1.04.
    """
    smooth = GaussianMixture.random((1, 4, 4), 4, rank=2, mode_var=0.3, iso_var=0.1, seed=3)
    latents = torch.randn(256, 1, 4, 4, generator=seeded(9))

    def endpoint(steps):
        scheduler = schedulers.get_sampler("ddim").create({"clip_sample": False}, timestep_spacing="trailing")
        pipe = make_pipeline(smooth, scheduler)
        return pipe(batch_size=256, num_inference_steps=steps, latents=latents, output_type="raw").images

    reference = endpoint(1000)
    errors = torch.tensor([((endpoint(n) - reference) ** 2).mean().sqrt().item() for n in (10, 20, 40, 80)])
    slopes = torch.log2(errors[:-1] / errors[1:])
    assert torch.all((slopes - 1).abs() <= 0.3), slopes


def test_deterministic_ddim_ignores_the_generator(mixture):
    latents = torch.randn(64, 1, 4, 4, generator=seeded(0))
    pipe = make_pipeline(mixture, schedulers.get_sampler("ddim").create({"clip_sample": False}))
    a = pipe(batch_size=64, num_inference_steps=20, latents=latents, generator=seeded(1), output_type="raw").images
    b = pipe(batch_size=64, num_inference_steps=20, latents=latents, generator=seeded(2), output_type="raw").images
    assert torch.equal(a, b)


@pytest.mark.parametrize("steps, max_rms", [(1000, 0.008), (200, 0.02)])  # measured 0.004 and 0.011
def test_ddim_inversion_round_trips(mixture, steps, max_rms):
    pipe = make_pipeline(mixture, schedulers.get_sampler("ddim").create({"clip_sample": False}))
    x0 = mixture.sample(200, seeded(5)).float()
    x_T = pipe.invert(x0, steps)
    assert 0.85 <= x_T.std().item() <= 1.15  # inverted latents look like N(0, I)
    back = pipe(batch_size=200, num_inference_steps=steps, latents=x_T, output_type="raw").images
    assert ((back - x0) ** 2).mean().sqrt().item() <= max_rms


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction", "score", "velocity"])
def test_every_parameterization_drives_the_same_sampler(mixture, prediction_type):
    latents = torch.randn(64, 1, 4, 4, generator=seeded(3))

    def run(kind):
        scheduler = schedulers.get_sampler("ddpm").create({"clip_sample": False, "prediction_type": kind})
        pipe = make_pipeline(mixture, scheduler, prediction_type=kind)
        return pipe(batch_size=64, num_inference_steps=50, latents=latents, generator=seeded(4),
                    output_type="raw").images

    assert (run(prediction_type) - run("epsilon")).abs().max() <= 1e-4


def test_class_labels_select_their_components(class_mixture):
    pipe = make_pipeline(class_mixture, schedulers.get_sampler("ddim").create({"clip_sample": False}))
    for label in range(3):
        x = pipe(batch_size=500, num_inference_steps=100, class_labels=label, generator=seeded(label),
                 output_type="raw").images
        components = class_mixture.component_of(x)
        assert (class_mixture.classes[components] == label).float().mean() >= 0.99
        assert mode_weight_error(class_mixture, x, class_labels=label) <= 0.06
