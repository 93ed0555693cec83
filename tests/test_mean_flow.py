"""MeanFlow (Geng et al. 2025): the two-time network, the JVP-identity objective, the mean-flow sampler and a
training run through ``python -m train.diffusion``."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

import schedulers
from models.mean_flow_unet import MeanFlowUNet2DModel
from models.unet import build_unet
from pipelines import DiffusionImagePipeline
from schedulers import MeanFlowScheduler
from schedulers.processes import FlowProcess
from tests.test_training import STEPS, assert_same_run, environment
from train.objectives import MeanFlowObjective, TrainingBatch, make_objective

REPO = Path(__file__).resolve().parents[1]
NULL = 10

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_mean_flow(seed: int = 0, dtype=torch.float64) -> MeanFlowUNet2DModel:
    torch.manual_seed(seed)
    return build_unet("tiny", 8, 1, num_classes=10, model_class=MeanFlowUNet2DModel).to(dtype).eval()


def randomize_interval_embedding(model: MeanFlowUNet2DModel) -> None:
    """Give the zero-initialised interval branch weights, as training would."""
    with torch.no_grad():
        for parameter in model.interval_embedding.parameters():
            parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ the network


def test_a_fresh_model_is_its_unet_at_every_interval_and_round_trips_its_config(tmp_path):
    model = tiny_mean_flow()
    plain = UNet2DModel.from_config(model.config).to(torch.float64).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(name.startswith("interval_embedding.") for name in unexpected)
    x, labels = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([3, NULL])
    with torch.no_grad():
        expected = plain(x, 0.4, class_labels=labels).sample
        for interval in (None, 0.0, 0.25, torch.tensor([0.4, 0.01])):
            assert torch.allclose(model(x, 0.4, class_labels=labels, interval=interval).sample, expected)
    randomize_interval_embedding(model)
    model.save_pretrained(tmp_path / "unet")
    loaded = MeanFlowUNet2DModel.from_pretrained(tmp_path / "unet").to(torch.float64).eval()
    with torch.no_grad():
        ours, theirs = (m(x, 0.4, class_labels=labels, interval=0.25).sample for m in (model, loaded))
        assert torch.allclose(ours, theirs)
        assert not torch.allclose(ours, model(x, 0.4, class_labels=labels).sample)  # the interval is read


# ------------------------------------------------------------------------------------------------ the objective


def moving_batch(objective: MeanFlowObjective, n: int = 4) -> TrainingBatch:
    batch = objective.sample(torch.rand(n, 1, 8, 8, dtype=torch.float64) * 2 - 1, torch.tensor([1, 2, NULL, 4][:n]),
                             torch.Generator().manual_seed(3))
    kwargs = {**batch.model_kwargs, "timestep": batch.model_kwargs["timestep"].double(),
              "interval": batch.model_kwargs["interval"].double()}
    return batch._replace(noisy=batch.noisy.double(), target=batch.target.double(), model_kwargs=kwargs)


def test_the_target_is_the_meanflow_identity_by_finite_differences():
    """sg(v − (t − r) d/dt u) with d/dt u = v ∂_z u + ∂_t u (eq. 8): the JVP against central differences of u along
    (z, time, interval) → (z + εv, time + ε, interval + ε), and plain v where r = t."""
    model = tiny_mean_flow()
    randomize_interval_embedding(model)
    objective = make_objective("mean-flow", mean_flow_ratio=0.5, null_class_id=NULL)
    batch = moving_batch(objective)
    t, r = batch.aux["t"], batch.aux["r"]
    assert (t >= r).all() and (t == r).any() and (t != r).any()  # both kinds in the batch
    target = objective.target(model, batch)
    kwargs, v, eps = batch.model_kwargs, batch.target, 1e-4

    def u(shift):
        with torch.no_grad():
            return model(batch.noisy + shift * v, kwargs["timestep"] + shift,
                         class_labels=kwargs["class_labels"], interval=kwargs["interval"] + shift).sample

    derivative = (u(eps) - u(-eps)) / (2 * eps)
    correction = (t - r).reshape(-1, 1, 1, 1) * derivative
    assert correction.abs().max() > 0.1  # not negligible here
    # diffusers embeds the timestep in float32, whose rounding limits the differences' accuracy
    assert (target - (v - correction)).abs().max() < 0.01 * correction.abs().max()
    assert torch.equal(target[t == r], v[t == r])


def test_trained_in_guidance_mixes_the_unconditional_velocity_into_labelled_samples_only():
    """ṽ = ω v + (1 − ω) u_θ(z, t, t | ∅) (eq. 16) for the labelled samples; the null-class ones keep v."""
    model = tiny_mean_flow()
    objective = make_objective("mean-flow", mean_flow_ratio=1e-9, mean_flow_guidance=2.0, null_class_id=NULL)
    batch = moving_batch(objective)
    assert torch.equal(batch.aux["t"], batch.aux["r"])  # all r = t: the target is the guided velocity itself
    labels = batch.model_kwargs["class_labels"]
    with torch.no_grad():
        unconditional = model(batch.noisy, batch.model_kwargs["timestep"], class_labels=torch.full_like(labels, NULL))
    guided = 2.0 * batch.target - unconditional.sample
    target = objective.target(model, batch)
    labelled = labels != NULL
    assert labelled.any() and (~labelled).any()
    assert torch.allclose(target[labelled], guided[labelled])
    assert torch.equal(target[~labelled], batch.target[~labelled])


def test_the_loss_uses_the_adaptive_weight():
    """L = sg(1/(‖Δ‖² + c)) ‖Δ‖² per sample (§4.3, p = 1): below 1, and its gradient is the weighted one."""
    model = tiny_mean_flow(dtype=torch.float32)
    objective = make_objective("mean-flow", null_class_id=NULL)
    x0, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([1, 2, 3, 4])
    batch = objective.sample(x0, labels, torch.Generator().manual_seed(0))
    loss, per_pixel = objective.training_loss(model, batch)
    squared = per_pixel * 64
    assert torch.allclose(loss, (squared / (squared + 1e-3)).mean()) and loss < 1


@pytest.mark.parametrize("options, message", [
    ({"mean_flow_ratio": 0.0}, r"mean_flow_ratio .* must be in \(0, 1\], got 0.0"),
    ({"mean_flow_guidance": 0.5, "null_class_id": NULL}, "mean_flow_guidance ω must be ≥ 1"),
    ({"mean_flow_guidance": 2.0}, "needs a class-conditional model trained with label dropout"),
    ({"timestep_sampling": "importance"}, "mean-flow samples .* 'uniform' or 'logit_normal', got 'importance'"),
])
def test_bad_mean_flow_options_raise_errors_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        make_objective("mean-flow", **options)


# ------------------------------------------------------------------------------------------------ the sampler


def mean_flow_config() -> dict:
    """A MeanFlow model's scheduler config: the flow process with times unscaled (num_train_timesteps 1)."""
    return make_objective("mean-flow").scheduler_config()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_each_step_jumps_by_its_interval_with_the_average_velocity(steps):
    """z_r = z_t − (t − r) u (eq. 5): the intervals chain the grid's levels to 0, each an equal share of t_0 (no
    evaluation spent on a last jump from σ_min), so with a constant u the run ends at z_1 − t_0 u whatever the
    number of steps, in one network call each."""
    spec = schedulers.get_sampler("mean-flow")
    assert spec.nfe(steps, mean_flow_config()) == steps
    scheduler = spec.create(mean_flow_config())
    scheduler.set_timesteps(steps)
    intervals = torch.stack([scheduler.model_inputs(t)["interval"] for t in scheduler.timesteps])
    assert (intervals > 0).all() and intervals.sum().item() == pytest.approx(scheduler.timesteps[0].item(), rel=1e-5)
    assert torch.allclose(intervals, intervals.mean().expand(steps), rtol=1e-4)
    noise, velocity = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x = noise * scheduler.init_noise_sigma
    z_start = scheduler.scale_model_input(x, scheduler.timesteps[0])
    for t in scheduler.timesteps:
        x = scheduler.step(velocity, t, x).prev_sample
    t0 = scheduler.timesteps[0].item()  # the timestep is t itself
    assert torch.allclose(x, z_start - t0 * velocity, atol=1e-5)


def test_it_needs_a_mean_flow_model_and_names_bad_input():
    with pytest.raises(ValueError, match="needs mean_flow_objective from the model: train one"):
        schedulers.get_sampler("mean-flow").create(dict(FlowProcess.config_defaults))
    assert "mean-flow" not in schedulers.samplers_for("flow", dict(FlowProcess.config_defaults))
    offered = schedulers.samplers_for("flow", mean_flow_config())
    assert offered[0] == "mean-flow" and "dpmpp-2m" in offered  # at interval 0 it is a flow model
    with pytest.raises(ValueError, match="mean_flow_objective must be one of"):
        MeanFlowScheduler(mean_flow_objective="consistency-training")
    scheduler = schedulers.get_sampler("mean-flow").create(mean_flow_config())
    with pytest.raises(ValueError, match="num_inference_steps must be an integer ≥ 1, got 0"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="timestep 0.125 is not in this scheduler's timesteps"):
        scheduler.model_inputs(torch.tensor(0.125))


# ------------------------------------------------------------------------------------------------ training


def train_mean_flow(output_dir: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable,),
                    batch_size: int = 8) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "train.diffusion", "--objective", "mean-flow", "--mean-flow-guidance", "2",
               "--conditional", "--label-dropout", "0.2", "--model", "tiny", "--image-size", "16",
               "--max-train-images", "64", "--batch-size", str(batch_size), "--grad-accum", "2", "--steps", str(STEPS),
               "--lr", "3e-3", "--warmup", "2", "--sample-every", "0", "--seed", "0", "--checkpoint-every", "8",
               "--keep-checkpoints", "3", "--output-dir", str(output_dir), *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def mean_flow_run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("mean-flow") / "run"
    train_mean_flow(output_dir)
    return output_dir


def test_a_run_resumes_exactly_and_samples_in_one_step(mean_flow_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(mean_flow_run, resumed)
    shutil.rmtree(resumed / f"checkpoint-{STEPS}")  # as if the run had died after its step-16 checkpoint
    result = train_mean_flow(resumed, "--resume", "latest")
    assert "resumed from" in result.stdout + result.stderr
    assert_same_run(resumed, mean_flow_run)
    pipeline = DiffusionImagePipeline.from_pretrained(mean_flow_run / "model")
    assert isinstance(pipeline.unet, MeanFlowUNet2DModel) and isinstance(pipeline.scheduler, MeanFlowScheduler)
    info = pipeline.config.model_info
    assert info["objective"] == "mean-flow" and info["mean_flow_guidance"] == 2.0
    pipeline.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        output = pipeline(batch_size=2, num_inference_steps=steps, class_labels=[3, 7], guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(0), output_type="pt")
        assert output.nfe == steps and torch.isfinite(output.images).all()
    pipeline.set_sampler("heun")  # the same network at interval 0: a flow model for the ODE solvers
    assert torch.isfinite(pipeline(batch_size=1, num_inference_steps=2, output_type="pt").images).all()


def test_two_processes_train_the_same_mean_flow_run(mean_flow_run, tmp_path):
    """2 processes × batch 4: the JVP and the guidance's unconditional call run per shard, on the unwrapped network."""
    output_dir = tmp_path / "run"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    train_mean_flow(output_dir, launcher=launcher, batch_size=4)
    assert json.loads((output_dir / "train_config.json").read_text())["num_processes"] == 2
    assert_same_run(output_dir, mean_flow_run, rtol=1e-5, atol=1e-6, noise_driven_atol=1e-3)
