"""The GAN baseline: losses against hand-computed values, O-GAN's correlation, training and exact resume."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from models.gan import Critic, Generator
from pipelines import GANPipeline
from train.gan import (
    correlation,
    hinge_critic_loss,
    hinge_generator_loss,
    ns_critic_loss,
    ns_generator_loss,
    qp_critic_loss,
    qp_generator_loss,
    rms_distance,
)
from train.gan import main as train_gan

T_REAL = torch.tensor([1.0, 2.0])
T_FAKE = torch.tensor([0.5, -1.0])
X_REAL = torch.zeros(2, 1, 2, 2)
X_FAKE = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.5)])  # RMS distances 1 and 0.5
TINY = ["--dataset", "mnist", "--image-size", "16", "--max-train-images", "64", "--batch-size", "16",
        "--latent-dim", "8", "--base-channels", "8", "--seed", "3", "--sample-every", "0", "--keep-checkpoints", "3"]


def test_rms_distance_is_per_sample():
    assert torch.allclose(rms_distance(X_REAL, X_FAKE), torch.tensor([1.0, 0.5]))


def test_gan_qp_losses_match_hand_computed_values():
    # ΔT = (0.5, 3); critic: mean(−ΔT + ΔT²/(2·10·d)) = mean(−0.5 + 0.25/20, −3 + 9/10) = mean(−0.4875, −2.1)
    assert qp_critic_loss(T_REAL, T_FAKE, X_REAL, X_FAKE).item() == pytest.approx(-1.29375)
    assert qp_critic_loss(T_REAL, T_FAKE, X_REAL, X_FAKE, qp_lambda=1.0).item() == pytest.approx(
        ((-0.5 + 0.25 / 2) + (-3 + 9 / 1)) / 2)
    assert qp_generator_loss(T_REAL, T_FAKE).item() == pytest.approx(1.75)


def test_gan_qp_critic_optimum_is_lambda_times_distance():
    """For one pair, ΔT − ΔT²/(2λd) peaks at ΔT = λd: the critic's adaptive Lipschitz constraint (Su, GAN-QP)."""
    delta = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.SGD([delta], lr=10.0)  # the per-sample curvature is 1/(2·λd)
    for _ in range(100):
        optimizer.zero_grad()
        qp_critic_loss(delta, torch.zeros(2), X_REAL, X_FAKE).backward()
        optimizer.step()
    assert torch.allclose(delta.detach(), 10 * torch.tensor([1.0, 0.5]), atol=1e-4)


def test_baseline_losses_match_hand_computed_values():
    assert hinge_critic_loss(T_REAL, T_FAKE).item() == pytest.approx((0 + 0) / 2 + (1.5 + 0) / 2)
    assert hinge_generator_loss(T_REAL, T_FAKE).item() == pytest.approx(0.25)

    def softplus(v):
        return math.log1p(math.exp(v))

    assert ns_critic_loss(T_REAL, T_FAKE).item() == pytest.approx(
        (softplus(-1) + softplus(-2)) / 2 + (softplus(0.5) + softplus(-1)) / 2)
    assert ns_generator_loss(T_REAL, T_FAKE).item() == pytest.approx((softplus(-0.5) + softplus(1)) / 2)


def test_correlation_is_per_sample_pearson():
    z = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    code = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # centred: z = (−1, 0, 1); codes (−2, 0, 2), (1, 0, −1), (−1, 1, 0) → ρ = 1, −1, 1/2
    assert torch.allclose(correlation(z, code), torch.tensor([1.0, -1.0, 0.5]))


def test_networks_shapes_and_conditioning():
    generator = Generator(latent_dim=8, base_channels=8, image_size=16, num_classes=3)
    critic = Critic(latent_dim=8, base_channels=8, image_size=16, num_classes=3, ogan=True)
    images = generator(torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert images.shape == (5, 1, 16, 16) and images.abs().max() <= 1
    score, code = critic(images, torch.tensor([0, 1, 2, 0, 1]))
    assert score.shape == (5,) and code.shape == (5, 8)
    # O-GAN's simplest critic: the score is the mean of the code (plus the class projection)
    unconditional = Critic(latent_dim=8, base_channels=8, image_size=16, ogan=True)
    score, code = unconditional(images)
    assert torch.allclose(score, code.mean(dim=1))
    with pytest.raises(ValueError, match="class-conditional"):
        generator(torch.randn(2, 8))
    with pytest.raises(ValueError, match="4 times a power of 2"):
        Generator(image_size=24)


def _metrics(run_dir):
    """The logged training numbers, without the measured (machine-dependent) CPU time."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key != "cpu_seconds"} for row in rows]


@pytest.fixture(scope="module")
def ogan_run(tmp_path_factory):
    """An uninterrupted O-GAN run of 40 steps on 64 digits (16×16)."""
    run_dir = tmp_path_factory.mktemp("gan") / "run"
    train_gan([*TINY, "--ogan", "--lr", "1e-3", "--steps", "40", "--checkpoint-every", "20",
               "--output-dir", str(run_dir)])
    return run_dir


def test_training_steps_improve_the_critic_and_the_encoder(ogan_run):
    logged = _metrics(ogan_run)
    assert [m["step"] for m in logged] == list(range(1, 41))
    first, last = logged[:5], logged[-5:]
    # the critic learns to separate real from fake (its QP loss falls) and its encoder to recover z (ρ rises)
    assert sum(m["critic_loss"] for m in last) < sum(m["critic_loss"] for m in first) - 0.5
    assert sum(m["correlation"] for m in last) / 5 > sum(m["correlation"] for m in first) / 5 + 0.2


def test_export_loads_and_encodes(ogan_run):
    pipe = GANPipeline.from_pretrained(ogan_run / "model")
    pipe.set_progress_bar_config(disable=True)
    info = pipe.config.model_info
    assert info["process"] == "gan" and info["ogan"] and info["num_classes"] == 10 and info["image_size"] == 16
    assert "python -m train.gan" in info["training_command"]
    out = pipe(batch_size=4, class_labels=[1, 2, 3, 4], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.nfe == 1 and out.images.shape == (4, 1, 16, 16)
    codes = pipe.encode(out.images * 2 - 1)
    assert codes.shape == (4, 8) and torch.allclose(codes.mean(dim=1), torch.zeros(4), atol=1e-5)
    assert pipe.reconstruct(out.images * 2 - 1, class_labels=[1, 2, 3, 4]).shape == (4, 1, 16, 16)


def test_resume_equals_the_uninterrupted_run(ogan_run, tmp_path):
    """Train to step 40, lose everything after the step-20 checkpoint, resume: the same losses and weights."""
    run_dir = tmp_path / "run"
    arguments = [*TINY, "--ogan", "--lr", "1e-3", "--steps", "40", "--checkpoint-every", "20",
                 "--output-dir", str(run_dir)]
    train_gan(arguments)
    for leftover in ("checkpoint-40", "model"):  # as if killed right after the step-20 checkpoint
        shutil.rmtree(run_dir / leftover)
    train_gan([*arguments, "--resume", "latest"])
    assert _metrics(run_dir) == _metrics(ogan_run)
    for weights in ("checkpoint-40/model.safetensors", "checkpoint-40/model_1.safetensors",
                    "model/generator/diffusion_pytorch_model.safetensors"):
        ours, reference = load_file(run_dir / weights), load_file(ogan_run / weights)
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[name], reference[name]) for name in ours), weights


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        train_gan([*TINY, "--steps", "2", "--critic-steps", "0", "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        train_gan([*TINY, "--steps", "2", "--loss", "wasserstein", "--output-dir", str(tmp_path / "x")])
