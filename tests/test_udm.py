"""UDM: the operators F_t(x0, ε), the three sampling rules with an oracle x̂0, the noise operator against DDIM
and DDPM (ours and diffusers'), the objective, and a tiny udm-blur run exported and sampled with every rule."""

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM

import schedulers
from pipelines import DiffusionImagePipeline
from schedulers.processes.udm import MASK_VALUE, UDMOperator, model_timestep
from schedulers.udm import UDMScheduler
from train import diffusion
from train.objectives import make_objective

from .conftest import seeded

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 1, 8, 8, generator=seeded(0), dtype=torch.float64) * 2 - 1


def run(scheduler, x, model, num_steps=None, generator=None, steps=None):
    """Drive ``scheduler`` by hand from x with ``model(x, t) → x̂0``, on ``num_steps`` even steps or ``steps``."""
    scheduler.set_timesteps(num_steps, steps=steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("operator, rule, noise", [("blur", "improved", 0.0), ("mask", "improved", 0.0),
                                                   ("blur", "invertible", 0.05), ("mask", "invertible", 0.05),
                                                   ("noise", "invertible", 0.0)])
def test_oracle_x0_reconstructs_exactly(images, operator, rule, noise):
    T = 1000 if operator == "noise" else 40
    scheduler = UDMScheduler(num_train_timesteps=T, udm_operator=operator, udm_noise=noise, udm_rule=rule)
    x_T = scheduler.add_noise(images, torch.randn(images.shape, generator=seeded(1), dtype=torch.float64),
                               model_timestep(T, T))
    out = run(scheduler, x_T, lambda x, t: images, 10)
    assert torch.allclose(out, images, atol=1e-10)
    if operator != "noise":  # the naive rule re-noises from scratch: it ends on x̂0 too, but passes elsewhere
        naive = UDMScheduler(num_train_timesteps=T, udm_operator=operator, udm_noise=0.05, udm_rule="naive")
        naive.set_timesteps(10)
        first = naive.step(images, naive.timesteps[0], x_T, generator=seeded(2)).prev_sample
        assert not torch.allclose(first, scheduler.add_noise(images, torch.zeros_like(images),
                                                             naive.timesteps[1]))


def test_identity_operator_leaves_x_unchanged_under_the_improved_rule(images):
    scheduler = UDMScheduler(num_train_timesteps=50, udm_operator="identity", udm_rule="improved")
    x = torch.randn(images.shape, generator=seeded(3), dtype=torch.float64)
    out = run(scheduler, x, lambda x, t: torch.randn(x.shape, generator=seeded(int(t)), dtype=x.dtype), 25)
    assert torch.equal(out, x)


def _x0_model(x, t):
    """Any smooth x̂0(x, t): what a trained network might say."""
    return torch.tanh(0.8 * x) * (1 - float(t) / 2000)


def test_noise_operator_with_the_invertible_rule_is_ddim(images):
    x_T = torch.randn(images.shape, generator=seeded(5), dtype=torch.float64)
    udm = UDMScheduler(num_train_timesteps=1000, udm_operator="noise", udm_rule="invertible")
    ours = schedulers.DDIMScheduler(prediction_type="sample", clip_sample=False)
    theirs = DiffusersDDIM(prediction_type="sample", clip_sample=False, set_alpha_to_one=True)
    theirs.set_timesteps(50)
    grid = [t + 1 for t in theirs.timesteps.tolist()] + [0]  # UDM step t is diffusers' index t − 1; 0 is clean
    out = run(udm, x_T, lambda x, t: _x0_model(x, t - 1), None, steps=grid)
    for ddim in (ours, theirs):
        ddim.set_timesteps(50)
        x = x_T.clone()
        for t in ddim.timesteps:
            x = ddim.step(_x0_model(x, t), t, x).prev_sample
        assert torch.allclose(out, x, atol=1e-5)


def test_noise_operator_with_eta_1_is_the_ddpm_posterior(images):
    x_t = torch.randn(images.shape, generator=seeded(6), dtype=torch.float32)
    x0 = images.float()
    udm = UDMScheduler(num_train_timesteps=1000, udm_operator="noise", udm_rule="invertible", eta=1.0)
    # diffusers forms β_t = 1 − ᾱ²_t/ᾱ²_{t−1} in float32 and loses digits at small t (5e-5 at t = 1); ours doesn't
    for ddpm, atol in ((schedulers.DDPMScheduler(prediction_type="sample", clip_sample=False), 2e-6),
                       (DiffusersDDPM(prediction_type="sample", clip_sample=False), 1e-4)):
        ddpm.set_timesteps(1000)
        for t in (999, 500, 20, 1):
            udm.set_timesteps(None, steps=[t + 1, t, 0])
            ours = udm.step(x0, udm.timesteps[0], x_t, generator=seeded(t)).prev_sample
            theirs = ddpm.step(x0, t, x_t, generator=seeded(t)).prev_sample
            assert torch.allclose(ours, theirs, atol=atol)
            assert not torch.allclose(ours, udm.operator.forward(x0, None, t), atol=1e-2)  # noise was drawn


def test_blur_keeps_the_mean_colour_and_ends_flat(images):
    op = UDMOperator("blur", 200, noise=0.0)
    blurred = [op.degrade(images, t) for t in (0, 1, 50, 200)]
    assert torch.equal(blurred[0], images)
    for x in blurred[1:]:
        assert torch.allclose(x.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-12)
    spread = [x.std(dim=(2, 3)).mean().item() for x in blurred]
    assert all(a > b for a, b in zip(spread, spread[1:]))
    assert spread[-1] < 1e-3 * spread[0]


def test_mask_hides_t_over_T_of_the_pixels_progressively():
    op = UDMOperator("mask", 16, noise=0.0)
    x0 = torch.ones(1, 1, 8, 8)
    previous = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    for t in range(17):
        masked = op.degrade(x0, t) == MASK_VALUE
        assert masked.sum().item() == 4 * t
        assert torch.all(masked | ~previous)
        previous = masked


def test_invertible_rule_needs_noise_and_bad_settings_raise():
    scheduler = UDMScheduler(num_train_timesteps=10, udm_operator="blur", udm_noise=0.0, udm_rule="invertible")
    scheduler.set_timesteps(5)
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="not invertible"):
        scheduler.step(x, scheduler.timesteps[0], x)
    for kwargs, message in [({"udm_operator": "warp"}, "unknown UDM operator"), ({"udm_rule": "best"}, "udm_rule"),
                            ({"udm_noise": -1.0}, "udm_noise"), ({"prediction_type": "epsilon"}, "predict x0")]:
        with pytest.raises(ValueError, match=message):
            UDMScheduler(**kwargs)
    with pytest.raises(ValueError, match="num_inference_steps"):
        UDMScheduler(num_train_timesteps=10).set_timesteps(11)
    with pytest.raises(ValueError, match="udm_prior_mean"):
        UDMScheduler().sample_prior((1, 1, 4, 4))


def test_objective_trains_x0_on_the_operator_and_records_the_prior_colour():
    objective = make_objective("udm-blur", label_dropout=0.0, null_class_id=10, udm_loss="l1", udm_noise=0.02)
    x0 = torch.rand(64, 1, 8, 8, generator=seeded(7)) * 2 - 1
    batch = objective.sample(x0, torch.zeros(64, dtype=torch.long), seeded(8))
    t = batch.model_kwargs["timestep"] * 200 / 1000
    assert torch.equal(t, t.round()) and t.min() >= 1 and t.max() <= 200
    residual = batch.noisy - objective.forward_process.operator.degrade(x0, t.long())
    assert residual.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(batch.target, x0)
    loss, per_sample = objective.loss(torch.zeros_like(x0), batch)
    assert torch.allclose(per_sample, x0.abs().flatten(1).mean(1)) and loss == pytest.approx(x0.abs().mean().item())
    mean, std = objective.scheduler_config()["udm_prior_mean"], objective.scheduler_config()["udm_prior_std"]
    assert mean[0] == pytest.approx(x0.mean().item(), abs=1e-6)
    assert std[0] == pytest.approx(x0.mean(dim=(1, 2, 3)).std(unbiased=False).item(), abs=1e-6)
    with pytest.raises(ValueError, match="udm_loss"):
        make_objective("udm-mask", udm_loss="huber")


def test_objective_records_the_prior_colour_per_class_once_every_class_is_seen():
    objective = make_objective("udm-blur", label_dropout=0.5, null_class_id=3)
    x0 = torch.rand(60, 1, 8, 8, generator=seeded(7)) * 2 - 1
    labels = torch.arange(60) % 3
    x0 = x0 + labels[:, None, None, None] * 0.1  # class c one tenth brighter per class
    objective.sample(x0[labels < 2], labels[labels < 2], seeded(8))
    assert objective.scheduler_config()["udm_prior_class_mean"] is None  # class 2 not seen yet
    objective.sample(x0[labels == 2], labels[labels == 2], seeded(9))
    config = objective.scheduler_config()
    colours = x0.double().mean(dim=(1, 2, 3))
    for c in range(3):  # before label dropout: every image counts for its own class
        assert config["udm_prior_class_mean"][c][0] == pytest.approx(colours[labels == c].mean().item(), abs=1e-9)
        assert config["udm_prior_class_std"][c][0] == pytest.approx(colours[labels == c].std(unbiased=False).item(),
                                                                    abs=1e-9)
    assert config["udm_prior_mean"][0] == pytest.approx(colours.mean().item(), abs=1e-9)
    resumed = make_objective("udm-blur", null_class_id=3)
    resumed.load_state_dict(objective.state_dict())
    assert resumed.scheduler_config() == config


def test_blur_prior_draws_each_class_colour_and_the_global_one_without_a_class():
    operator = UDMOperator("blur", 10, noise=0.0, prior_mean=[0.0], prior_std=[0.5],
                           prior_class_mean=[[-0.9], [0.4]], prior_class_std=[[0.01], [0.02]])
    labels = torch.tensor([0, 1, 2] * 400)  # 2: the null class, outside the table
    prior = operator.prior((1200, 1, 4, 4), generator=seeded(0), class_labels=labels)
    colour = prior[:, 0, 0, 0]
    assert torch.equal(prior, colour[:, None, None, None].expand_as(prior))  # flat, as F_T(x0)
    for label, mean, std in [(0, -0.9, 0.01), (1, 0.4, 0.02), (2, 0.0, 0.5)]:
        assert colour[labels == label].mean().item() == pytest.approx(mean, abs=4 * std / 20)
        assert colour[labels == label].std().item() == pytest.approx(std, rel=0.1)
    unconditional = operator.prior((1200, 1, 4, 4), generator=seeded(0))
    assert unconditional[:, 0, 0, 0].std().item() == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="udm_prior_class_mean"):
        UDMOperator("blur", 10, prior_mean=[0.0], prior_std=[0.5], prior_class_mean=[[0.0, 1.0]],
                    prior_class_std=[[0.1, 0.1]]).prior((2, 1, 4, 4), class_labels=torch.tensor([0, 0]))


def test_udm_samplers_are_offered_only_to_udm_models():
    assert schedulers.samplers_for("udm-blur") == ["udm-improved", "udm-invertible", "udm-naive"]
    assert not {"udm-naive", "udm-improved"} & set(schedulers.samplers_for("vp"))


def test_trained_udm_blur_model_exports_a_pipeline_that_samples_with_every_rule(tmp_path):
    diffusion.main(["--objective", "udm-blur", "--model", "tiny", "--image-size", "16", "--max-train-images", "32",
                    "--steps", "3", "--batch-size", "8", "--warmup", "1", "--sample-every", "0",
                    "--output-dir", str(tmp_path / "run"), "--export", str(tmp_path / "model")])
    pipe = DiffusionImagePipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.model_info["process"] == "udm-blur" and pipe.config.model_info["udm_loss"] == "l1"
    assert pipe.scheduler.config.udm_rule == "improved" and len(pipe.scheduler.config.udm_prior_mean) == 1
    class_mean = pipe.scheduler.config.udm_prior_class_mean  # the blur prior's colour per class (MNIST's ten)
    assert len(class_mean) == 10 and all(len(row) == 1 for row in class_mean)
    outputs = {}
    for rule in schedulers.samplers_for("udm-blur", pipe.scheduler.config):
        pipe.scheduler = schedulers.get_sampler(rule).create(pipe.scheduler.config)
        outputs[rule] = pipe(batch_size=3, num_inference_steps=4, class_labels=[0, 1, 2], guidance_scale=2.0,
                             generator=seeded(0), output_type="raw").images
        assert outputs[rule].shape == (3, 1, 16, 16) and torch.isfinite(outputs[rule]).all()
    assert not torch.allclose(outputs["udm-naive"], outputs["udm-improved"])
