"""Flow matching: the objective's path and target, the flow process's σ-space map, and a trained flow model end to end.

The exact mixture answers as a perfect rectified-flow network (``model_process="flow"``, velocity output),
so the σ-space samplers driven through the flow adapter must produce the same samples as when driven by the
VP-trained exact model on the same σ grid: the two networks describe the same denoiser.
"""

import diffusers
import pytest
import torch

import schedulers
from evaluation.exact import ExactScoreModel
from pipelines import DiffusionImagePipeline
from schedulers.processes import FlowProcess
from train.objectives import FlowObjective, make_objective

from .conftest import seeded

pytestmark = pytest.mark.usefixtures("single_thread")


def exact_pipeline(mixture, model_process, prediction_type, sampler, **overrides):
    model = ExactScoreModel.from_mixture(mixture, prediction_type, model_process=model_process)
    scheduler = schedulers.get_sampler(sampler).create(
        {"prediction_type": prediction_type, "model_process": model_process}, **overrides)
    pipe = DiffusionImagePipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp-3m", "flow-heun", "sde-pc", "rk45"])
def test_flow_model_samples_like_the_vp_model_of_the_same_mixture(mixture, sampler):
    grid = {"sigma_min": 0.01, "sigma_max": 80.0}  # one σ range for both: the defaults differ by process
    runs = [exact_pipeline(mixture, process, prediction, sampler, **grid)(
        batch_size=64, num_inference_steps=8, generator=seeded(0), output_type="raw").images
        for process, prediction in (("vp", "epsilon"), ("flow", "velocity"))]
    assert torch.allclose(runs[0], runs[1], atol=5e-5)


def test_flow_process_maps_sigma_to_the_straight_path():
    adapter = FlowProcess("velocity", num_train_timesteps=1000)
    sigma = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)
    t = sigma / (1 + sigma)
    assert torch.allclose(adapter.timestep(sigma), 1000 * t)
    assert torch.allclose(adapter.input_scale(sigma), 1 - t)
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    x_ve = x0 + sigma[:, None] * eps
    assert torch.allclose(adapter.denoised(eps - x0, x_ve, sigma[:, None]), x0)


def test_flow_samplers_are_offered_and_vp_only_ones_are_not():
    offered = schedulers.samplers_for("flow")
    assert {"euler", "heun", "dpmpp-2m", "flow-heun", "rk45", "sde-pc"} <= set(offered)
    assert not {"ddim", "ddpm", "analytic-ddpm"} & set(offered)  # discrete VP chains need ᾱ_t


def test_flow_objective_draws_the_straight_path_and_its_velocity():
    objective = FlowObjective(label_dropout=0.0, null_class_id=10)
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    labels = torch.arange(6)
    batch = objective.sample(x0, labels, seeded(0))
    g = seeded(0)
    t = torch.rand(6, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.allclose(batch.model_kwargs["timestep"], 1000 * t)
    assert torch.allclose(batch.noisy, (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise)
    assert torch.allclose(batch.target, noise - x0)
    assert torch.equal(batch.model_kwargs["class_labels"], labels)
    # the exact velocity of this batch has zero loss
    loss, per_sample = objective.loss(noise - x0, batch)
    assert loss == 0 and per_sample.shape == (6,)


def test_logit_normal_times_concentrate_mid_path():
    objective = FlowObjective(timestep_sampling="logit_normal")
    t = objective.sample(torch.zeros(4000, 1, 1, 1), None, seeded(1)).model_kwargs["timestep"] / 1000
    inner = ((t > 0.25) & (t < 0.75)).float().mean()
    assert 0.65 < inner < 0.75  # P(|N(0,1)| < log 3) = 0.728; uniform would give 0.5


@pytest.mark.parametrize("bad", [{"timestep_sampling": "importance"}, {"label_dropout": 1.0}])
def test_flow_objective_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        make_objective("flow", **bad)


def test_flow_objective_exports_a_heun_flow_scheduler():
    scheduler = FlowObjective().make_scheduler()
    assert scheduler.config.model_process == "flow" and scheduler.config.prediction_type == "velocity"
    scheduler.set_timesteps(4)
    sigma_max = scheduler.sigmas[0]
    assert torch.isclose(scheduler.timesteps[0].double(), 1000 * sigma_max / (1 + sigma_max), rtol=1e-5)


def test_a_flow_model_trains_exports_and_samples(tmp_path):
    from .test_training import run, training_command

    output_dir = tmp_path / "run"
    run(training_command(output_dir, "--objective", "flow", "--timestep-sampling", "uniform", "--steps", "6",
                         "--checkpoint-every", "3", "--sample-every", "0", "--conditional"))
    pipeline = DiffusionImagePipeline.from_pretrained(output_dir / "model")
    pipeline.set_progress_bar_config(disable=True)
    info = pipeline.config.model_info
    assert (info["process"], info["objective"], info["prediction_type"]) == ("flow", "flow", "velocity")
    assert pipeline.scheduler.config.model_process == "flow"
    offered = schedulers.samplers_for(info["process"], pipeline.scheduler.config)
    assert "flow-heun" in offered and "ddim" not in offered
    pipeline.scheduler = schedulers.get_sampler("flow-heun").create(pipeline.scheduler.config)
    output = pipeline(batch_size=2, num_inference_steps=3, class_labels=[3, 4], guidance_scale=2.0,
                      generator=seeded(0), output_type="pt")
    assert output.images.shape == (2, 1, 16, 16) and output.nfe == 2 * 5  # Heun: 2 per step, 1 on the last
    assert torch.isfinite(output.images).all()


@pytest.mark.parametrize("scheduler", [
    lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0),
    lambda: diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                  flow_shift=1.0)])
def test_diffusers_flow_matching_schedulers_drive_a_flow_model_through_the_pipeline(mixture, scheduler):
    """diffusers' flow schedulers have no ``init_noise_sigma`` or ``scale_model_input`` (SD3's pipeline calls
    neither); ours takes them as unit noise and the unscaled input, and lands where a tight solve of ours does."""
    pipe = exact_pipeline(mixture, "flow", "velocity", "dpmpp-3m")
    latents = torch.randn(256, *mixture.sample_shape, generator=seeded(3), dtype=torch.float64)
    tight = pipe(batch_size=256, num_inference_steps=200, latents=latents, output_type="raw").images
    pipe.scheduler = scheduler()
    out = pipe(batch_size=256, num_inference_steps=100, latents=latents, output_type="raw")
    assert out.nfe == 100
    assert (out.images - tight).pow(2).mean().sqrt() < 0.02
