"""Consistency models: the multistep consistency sampler, consistency distillation and consistency training."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import schedulers
from models.unet import build_unet
from pipelines import DiffusionImagePipeline
from schedulers import ConsistencyScheduler, ProbabilityFlowScheduler
from schedulers.processes import EDMProcess, FlowProcess, VPProcess
from tests.test_training import STEPS, assert_same_run, environment
from train.objectives import FlowObjective, make_objective, pseudo_huber

REPO = Path(__file__).resolve().parents[1]
NULL = 10


def consistency_config(process=FlowProcess, **overrides) -> dict:
    return {**process.config_defaults, "consistency_objective": "consistency-distillation", **overrides}


# ------------------------------------------------------------------------------------------------ the sampler


def test_one_to_four_steps_cost_one_evaluation_each_on_the_process_grid():
    spec = schedulers.get_sampler("consistency")
    scheduler = spec.create(consistency_config())
    assert scheduler.config.sigma_schedule == "flow"  # a flow model's natural grid; Karras's for vp and edm
    assert spec.create(consistency_config(EDMProcess)).config.sigma_schedule == "karras"
    for steps in (1, 2, 4):
        assert spec.nfe(steps, consistency_config()) == steps
    scheduler.set_timesteps(1)
    assert scheduler.sigmas.tolist() == pytest.approx([FlowProcess.SIGMA_MAX, 0.0])
    scheduler.set_timesteps(2)  # the midpoint of the 3-point grid uniform in t: t = 0.5, σ = 1
    assert scheduler.sigmas.tolist() == pytest.approx([FlowProcess.SIGMA_MAX, 1.0, 0.0])
    assert isinstance(ConsistencyScheduler.from_config(scheduler.config), ConsistencyScheduler)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_exact_consistency_function_of_gaussian_data_samples_it_exactly_at_any_step_count(steps):
    # Data N(0, 1): the ODE maps x_σ ~ N(0, 1 + σ²) to x_σ/sqrt(1 + σ²), which is the VP network input itself, so
    # the identity network predicting x0 is the exact consistency function; every step then lands on N(0, 1).
    scheduler = schedulers.get_sampler("consistency").create(consistency_config(VPProcess, prediction_type="sample"))
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 32, 32, generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(scheduler.scale_model_input(x, t), t, x, generator=generator).prev_sample
    assert x.std().item() == pytest.approx(1.0, abs=0.01) and abs(x.mean().item()) < 0.01


def test_it_is_offered_only_to_consistency_models_and_they_only_it():
    assert schedulers.samplers_for("flow", consistency_config()) == ["consistency"]
    with pytest.raises(ValueError, match="does not fit this model: it is a consistency model"):
        schedulers.get_sampler("dpmpp-2m").check_fits("flow", consistency_config())
    assert "consistency" not in schedulers.samplers_for("flow", dict(FlowProcess.config_defaults))
    assert "consistency" not in schedulers.samplers_for("pfgmpp", consistency_config())
    with pytest.raises(ValueError, match="needs consistency_objective from the model: distil one"):
        schedulers.get_sampler("consistency").create(dict(FlowProcess.config_defaults))


def test_bad_steps_and_intermediate_times_raise_clear_errors():
    scheduler = schedulers.get_sampler("consistency").create(consistency_config())
    with pytest.raises(ValueError, match="num_inference_steps must be an integer ≥ 1, got 0"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="first intermediate σ 600 is above the σ_max 500"):
        scheduler.set_timesteps(sigmas=[600.0, 1.0])
    with pytest.raises(ValueError, match="strictly descending"):
        scheduler.set_timesteps(sigmas=[1.0, 10.0])
    scheduler.set_timesteps(sigmas=[500.0, 3.0])  # chosen intermediate times
    assert scheduler.sigmas.tolist() == [500.0, 3.0, 0.0] and scheduler.nfe == 2
    with pytest.raises(ValueError, match="consistency_objective must be one of"):
        ConsistencyScheduler(consistency_objective="mean-flow")


# ------------------------------------------------------------------------------------------------ the objective


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny class-conditional flow model with random weights, exported as the trainer would."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("teacher") / "flow"
    info = {"process": "flow", "prediction_type": "velocity", "objective": "flow", "num_classes": 10,
            "null_class_id": NULL, "image_size": 16, "channels": 1, "model": "tiny"}
    DiffusionImagePipeline(build_unet("tiny", 16, 1, 10), FlowObjective().make_scheduler(), info).save_pretrained(
        directory, safe_serialization=True)
    return directory


def test_the_teacher_step_is_one_heun_step_of_the_teachers_ode(teacher):
    objective = make_objective("consistency-distillation", teacher=str(teacher), null_class_id=NULL)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 1, 16, 16, generator=generator) * 2 - 1
    labels = torch.tensor([3, NULL])
    sigma, sigma_next = objective.sigmas[[2, 15]], objective.sigmas[[3, 16]]
    x = x0 + sigma.reshape(-1, 1, 1, 1).float() * torch.randn(x0.shape, generator=generator)
    with torch.no_grad():
        stepped = objective.teacher_step(x, sigma, sigma_next, labels)
        for i in range(2):  # the project's Heun over the two-point grid, one sample at a time
            heun = ProbabilityFlowScheduler(**FlowObjective().scheduler_config(), final_sigma="sigma_min")
            heun.set_timesteps(sigmas=[float(sigma[i]), float(sigma_next[i])])
            xi = x[i:i + 1]
            for t in heun.timesteps:
                output = objective.teacher_unet(heun.scale_model_input(xi, t), t, class_labels=labels[i:i + 1]).sample
                xi = heun.step(output, t, xi).prev_sample
            torch.testing.assert_close(stepped[i:i + 1], xi, rtol=1e-4, atol=1e-4)


def test_the_loss_is_the_pseudo_huber_distance_between_the_students_answers(teacher):
    assert pseudo_huber(torch.zeros(3, 1, 4, 4), 0.1).tolist() == [0.0] * 3
    assert pseudo_huber(torch.full((1, 1, 4, 4), 10.0), 0.1).item() == pytest.approx(40.0 - 0.1, abs=1e-3)
    objective = make_objective("consistency-distillation", teacher=str(teacher), null_class_id=NULL)
    x0 = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batch = objective.sample(x0, torch.arange(8), torch.Generator().manual_seed(3))
    student = build_unet("tiny", 16, 1, 10)
    student.load_state_dict(objective.teacher_unet.state_dict())
    loss, per_sample = objective.training_loss(student, batch)
    assert loss.requires_grad and per_sample.shape == (8,) and torch.all(per_sample > 0)
    assert batch.aux["sigma_next"].tolist() == [objective.sigmas[objective.sigmas.tolist().index(s) + 1].item()
                                                for s in batch.aux["sigma"].tolist()]
    half = batch.select(slice(0, 4))  # a data-parallel shard keeps its aux tensors
    assert torch.equal(half.aux["state"], batch.aux["state"][:4])
    info, config = objective.model_info(), objective.scheduler_config()
    assert info["process"] == "flow" and info["teacher"] == str(teacher) and info["consistency_steps"] == 20
    assert config["consistency_objective"] == "consistency-distillation" and config["model_process"] == "flow"


def test_bad_teachers_and_steps_raise_errors_naming_them(teacher):
    with pytest.raises(ValueError, match="needs --teacher PIPELINE_DIR"):
        make_objective("consistency-distillation", null_class_id=NULL)
    with pytest.raises(ValueError, match="consistency_steps .* must be an integer ≥ 1, got 0"):
        make_objective("consistency-distillation", teacher=str(teacher), consistency_steps=0, null_class_id=NULL)
    with pytest.raises(ValueError, match="a 'udm-blur' model has no Gaussian probability-flow ODE"):
        make_objective("consistency-distillation", teacher=str(REPO / "checkpoints" / "mnist-udm-blur"),
                       null_class_id=NULL)
    with pytest.raises(ValueError, match="its null class is 10, the student's None"):
        make_objective("consistency-distillation", teacher=str(teacher), null_class_id=None)


def test_the_trainer_names_a_missing_teacher_without_a_traceback(tmp_path):
    command = [sys.executable, "-m", "train.diffusion", "--objective", "consistency-distillation", "--model", "tiny",
               "--image-size", "16", "--max-train-images", "64", "--steps", "1", "--output-dir", str(tmp_path / "x")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: consistency-distillation needs --teacher PIPELINE_DIR" in result.stderr


def test_distillation_trains_exports_and_samples_in_one_and_two_steps(teacher, tmp_path):
    output_dir = tmp_path / "student"
    command = [sys.executable, "-m", "train.diffusion", "--objective", "consistency-distillation", "--teacher",
               str(teacher), "--model", "tiny", "--image-size", "16", "--max-train-images", "64", "--batch-size", "8",
               "--steps", "4", "--warmup", "1", "--sample-every", "0", "--seed", "0", "--output-dir", str(output_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    pipeline = DiffusionImagePipeline.from_pretrained(output_dir / "model")
    assert isinstance(pipeline.scheduler, ConsistencyScheduler)
    assert pipeline.config.model_info["objective"] == "consistency-distillation"
    pipeline.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        output = pipeline(batch_size=2, num_inference_steps=steps, class_labels=[1, 2], guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0), output_type="pt")
        assert output.nfe == 2 * steps and torch.isfinite(output.images).all()


# ------------------------------------------------------------------------------------ consistency training (iCT)


def test_the_curriculum_doubles_the_grid_from_s0_to_s1_in_equal_stages():
    # s0 = 10, s1 = 1280: log2(128) + 1 = 8 stages over K = 800 batches, 100 each (iCT §3.4)
    objective = make_objective("consistency-training", training_batches=800)
    assert [objective.curriculum_steps(k) for k in (0, 99, 100, 250, 699, 700, 799, 5000)] == [
        10, 10, 20, 40, 640, 1280, 1280, 1280]
    short = make_objective("consistency-training", consistency_steps=40, training_batches=30)  # 3 stages of 10
    assert [short.curriculum_steps(k) for k in (0, 9, 10, 20, 29)] == [10, 10, 20, 40, 40]
    assert objective.grid(10).tolist()[0] == pytest.approx(80.0) and objective.grid(10).tolist()[-1] == pytest.approx(
        0.002)


def test_steps_are_drawn_from_icts_discretised_log_normal_and_weighted_by_the_inverse_step():
    objective = make_objective("consistency-training", training_batches=8)
    objective.load_state_dict({"batches_seen": torch.tensor(7)})  # the last stage: N = s1 = 1280
    x0 = torch.zeros(20000, 1, 1, 1)
    batch = objective.sample(x0, None, torch.Generator().manual_seed(0))
    sigma, sigma_next = batch.aux["sigma"].double(), batch.aux["sigma_next"].double()
    # ln σ ~ N(−1.1, 2²) restricted to [ln 0.002, ln 80]: its median is within a grid step of exp(−1.1)
    assert sigma.log().median().item() == pytest.approx(-1.1, abs=0.05)
    assert sigma.log().std().item() == pytest.approx(1.9, abs=0.1)  # the truncation trims the tails a little
    torch.testing.assert_close(batch.loss_weight.double(), 1 / (sigma - sigma_next), rtol=1e-4, atol=0)
    probabilities = objective.step_probabilities(objective.grid(1280).double())
    assert probabilities.sum().item() == pytest.approx(1.0) and torch.all(probabilities > 0)


def test_the_target_point_has_the_same_data_and_noise_at_the_lower_level():
    objective = make_objective("consistency-training", training_batches=100, null_class_id=NULL)
    x0 = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    batch = objective.sample(x0, torch.arange(8), torch.Generator().manual_seed(5))
    noise = batch.aux["noise"]
    torch.testing.assert_close(batch.aux["state"], x0 + batch.aux["sigma"].reshape(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(objective.target_state(batch), x0 + batch.aux["sigma_next"].reshape(-1, 1, 1, 1) * noise)
    loss, per_sample = objective.training_loss(build_unet("tiny", 16, 1, 10), batch)
    assert loss.requires_grad and torch.all(per_sample > 0)
    assert objective.scheduler_config()["consistency_objective"] == "consistency-training"
    assert objective.model_info()["process"] == "edm" and objective.initial_weights() is None


def test_the_curriculum_position_is_checkpointed():
    objective = make_objective("consistency-training", consistency_steps=40, training_batches=30)
    for _ in range(12):
        objective.sample(torch.zeros(2, 1, 4, 4), None, torch.Generator().manual_seed(0))
    resumed = make_objective("consistency-training", consistency_steps=40, training_batches=30)
    resumed.load_state_dict(objective.state_dict())
    assert resumed.batches_seen == 12 and resumed.curriculum_steps(resumed.batches_seen) == 20


@pytest.mark.parametrize(("options", "message"), [
    ({"consistency_steps": 5}, "at least the curriculum's first 10 grid steps, got 5"),
    ({"consistency_steps": 0}, "must be an integer ≥ 1, got 0"),
    ({"training_batches": 0}, "training_batches must be an integer ≥ 1, got 0"),
    ({"timestep_sampling": "logit_normal"}, "--timestep-sampling must stay 'uniform'"),
])
def test_bad_consistency_training_options_raise_errors_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        make_objective("consistency-training", **options)


def train_ct(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    # 4 steps, s1 = 20: a curriculum of two stages, N = 10 for batches 0–1 and N = 20 for batches 2–3
    command = [sys.executable, "-m", "train.diffusion", "--objective", "consistency-training", "--model", "tiny",
               "--image-size", "16", "--max-train-images", "64", "--batch-size", "8", "--steps", "4", "--warmup", "1",
               "--sample-every", "0", "--seed", "0", "--consistency-steps", "20", "--checkpoint-every", "2",
               "--output-dir", str(output_dir), *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_consistency_training_runs_from_scratch_resumes_exactly_and_samples_in_one_step(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_ct(straight)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoint-4")  # as if the run had died after its first checkpoint
    result = train_ct(resumed, "--resume", "latest")
    assert "resumed from" in result.stdout + result.stderr
    # the curriculum resumes at batch 2 (N = 20): restarting it at N = 10 would train other weights
    weights = [load_file(run / "checkpoint-4" / "model.safetensors") for run in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    pipeline = DiffusionImagePipeline.from_pretrained(straight / "model")
    assert isinstance(pipeline.scheduler, ConsistencyScheduler)
    assert pipeline.config.model_info["objective"] == "consistency-training"
    pipeline.set_progress_bar_config(disable=True)
    output = pipeline(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                      output_type="pt")
    assert output.nfe == 1 and torch.isfinite(output.images).all()


# ------------------------------------------------------------------------------------------------ data parallel


@pytest.mark.parametrize("objective", ["consistency-distillation", "consistency-training"])
def test_two_processes_train_the_same_consistency_run(objective, teacher, tmp_path):
    """2 processes × batch 4 train on the two halves of one process's global batches of 8: the same run (the
    teacher's step, the curriculum and the stop-gradient target all per sample)."""
    options = ["-m", "train.diffusion", "--objective", objective, "--conditional", "--label-dropout", "0.2",
               "--model", "tiny", "--image-size", "16", "--max-train-images", "64", "--grad-accum", "2", "--steps",
               str(STEPS), "--lr", "3e-3", "--warmup", "2", "--sample-every", "0", "--seed", "0",
               "--consistency-steps", "20", "--checkpoint-every", "8"]
    if objective == "consistency-distillation":
        options += ["--teacher", str(teacher)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    for command in ([sys.executable, *options, "--batch-size", "8", "--output-dir", str(one)],
                    [*launcher, *options, "--batch-size", "4", "--output-dir", str(two)]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=environment())
        assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / "train_config.json").read_text())["num_processes"] == 2
    # the same sums in another order; distillation's teacher step adds two network calls on the shard, whose rounding
    # the pseudo-Huber loss's small c carries into the gradient (grad norms 2e-5 apart, relative)
    tolerance = 1e-4 if objective == "consistency-distillation" else 1e-5
    assert_same_run(two, one, rtol=tolerance, atol=tolerance / 10, noise_driven_atol=1e-3)
