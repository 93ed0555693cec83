"""The VAE baselines: likelihood and KL against hand-computed values, spectral norms, training and exact resume."""

import json
import math
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import train.vae
from models.vae import (
    ConvVAE,
    HierarchicalVAE,
    discretized_logistic_log_likelihood,
    gaussian_kl,
)
from pipelines import VAEPipeline
from train.vae import kl_weight
from train.vae import main as train_vae

LEVELS = torch.linspace(-1, 1, 256)  # the 8-bit grid on [-1, 1]
TINY = ["--dataset", "mnist", "--image-size", "16", "--max-train-images", "64", "--batch-size", "16",
        "--seed", "5", "--sample-every", "0", "--keep-checkpoints", "3", "--lr", "3e-3", "--warmup", "2"]
NVAE = ["--model", "nvae", "--width", "8", "--latent-channels", "2", "--groups-per-scale", "1", "1",
        "--kl-warmup", "10"]


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_discretized_logistic_matches_hand_computed_bins():
    x = torch.tensor([-1.0, LEVELS[128].item(), 1.0]).view(1, 3, 1, 1)
    mean, log_scale = torch.tensor([0.0, 0.2, 0.5]).view(1, 3, 1, 1), torch.tensor([0.0, -1.0, -2.0]).view(1, 3, 1, 1)
    h = 1 / 255
    s1, s2 = math.exp(-1.0), math.exp(-2.0)
    expected = (math.log(sigmoid((-1 + h - 0.0) / 1.0))  # lowest bin: CDF up to its upper edge
                + math.log(sigmoid((LEVELS[128].item() + h - 0.2) / s1) - sigmoid((LEVELS[128].item() - h - 0.2) / s1))
                + math.log(1 - sigmoid((1 - h - 0.5) / s2)))  # highest bin: everything above its lower edge
    assert discretized_logistic_log_likelihood(x, mean, log_scale).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mean, log_scale", [(0.0, 0.0), (0.3, -3.0), (-0.99, -6.0), (2.0, 1.0)])
def test_discretized_logistic_sums_to_one_over_the_256_levels(mean, log_scale):
    x = LEVELS.view(256, 1, 1, 1)
    log_p = discretized_logistic_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert log_p.double().exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def test_residual_gaussian_kl_matches_the_closed_form():
    # Δμ = 1, Δσ = 1, σ = 2: ½(1/4 + 1 − 0 − 1) = 1/8
    assert gaussian_kl(torch.ones(1, 1), torch.zeros(1, 1), math.log(2.0)).item() == pytest.approx(0.125)
    generator = torch.Generator().manual_seed(0)
    mu, log_sigma, delta_mu, delta_log_sigma = (torch.randn(4, 6, generator=generator) for _ in range(4))
    posterior = torch.distributions.Normal(mu + delta_mu, torch.exp(log_sigma + delta_log_sigma))
    prior = torch.distributions.Normal(mu, torch.exp(log_sigma))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=1)
    assert torch.allclose(gaussian_kl(delta_mu, delta_log_sigma, log_sigma), expected, atol=1e-5)


def test_kl_warmup_is_linear_then_one():
    assert [kl_weight(s, 10, 0.1) for s in (0, 5, 10, 50)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    assert kl_weight(0, 0, 0.1) == 1.0


def test_spectral_norms_converge_to_the_largest_singular_values():
    model = ConvVAE(latent_dim=4, base_channels=4, image_size=16)
    exact = sum(torch.linalg.matrix_norm(m.weight.flatten(1), ord=2) for m in model._convolutions())
    assert model.spectral_norm_sum(power_iterations=1).item() < exact.item()
    for _ in range(50):
        estimate = model.spectral_norm_sum(power_iterations=4)
    assert estimate.item() == pytest.approx(exact.item(), rel=1e-3)
    estimate.backward()  # the gradient reaches the kernels
    assert model.decoder[-1].weight.grad is not None


def test_hierarchical_vae_starts_at_the_prior_and_samples():
    model = HierarchicalVAE(width=8, latent_channels=2, groups_per_scale=(2, 1), image_size=16, num_classes=3)
    images, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0])
    output = model(images, labels, generator=torch.Generator().manual_seed(0))
    assert output.mean.shape == output.log_scale.shape == (4, 1, 16, 16)
    assert torch.equal(output.kl, torch.zeros(4))  # q = p = N(0, I) in every group at initialisation
    assert model.sample(3, class_labels=labels[:3])[0].shape == (3, 1, 16, 16)
    with pytest.raises(ValueError, match="groups_per_scale"):
        HierarchicalVAE(groups_per_scale=(1, 1, 1), image_size=16)


def _metrics(run_dir):
    """The logged training numbers, without the measured (machine-dependent) CPU time."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key != "cpu_seconds"} for row in rows]


@pytest.fixture(scope="module")
def nvae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    train_vae([*TINY, *NVAE, "--steps", "30", "--checkpoint-every", "15", "--output-dir", str(run_dir)])
    return run_dir


def test_training_steps_reduce_the_negative_elbo(nvae_run):
    logged = _metrics(nvae_run)
    assert [m["step"] for m in logged] == list(range(1, 31))
    first = sum(m["elbo_bpd"] for m in logged[:3]) / 3
    last = sum(m["elbo_bpd"] for m in logged[-3:]) / 3
    assert last < first - 0.5, (first, last)


def test_export_loads_with_its_heldout_bits_per_dim(nvae_run):
    pipe = VAEPipeline.from_pretrained(nvae_run / "model")
    pipe.set_progress_bar_config(disable=True)
    info = pipe.config.model_info
    assert info["process"] == "vae" and info["model"] == "nvae" and info["num_classes"] == 10
    assert 0 < info["heldout_elbo_bits_per_dim"] < 8
    images = pipe(batch_size=3, class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(0),
                  output_type="raw").images
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1
    real = torch.linspace(-1, 1, 256)[torch.randint(256, (2, 1, 16, 16), generator=torch.Generator().manual_seed(1))]
    bits = pipe.bits_per_dim(real, class_labels=[3, 4], generator=torch.Generator().manual_seed(0))
    assert bits.shape == (2,) and torch.all(bits > 0)
    assert pipe.reconstruct(real, class_labels=[3, 4]).shape == (2, 1, 16, 16)


def test_resume_equals_the_uninterrupted_run(nvae_run, tmp_path):
    """Train to step 30, lose everything after the step-15 checkpoint, resume: the same losses and weights."""
    run_dir = tmp_path / "run"
    arguments = [*TINY, *NVAE, "--steps", "30", "--checkpoint-every", "15", "--output-dir", str(run_dir)]
    train_vae(arguments)
    for leftover in ("checkpoint-30", "model"):  # as if killed right after the step-15 checkpoint
        shutil.rmtree(run_dir / leftover)
    train_vae([*arguments, "--resume", "latest"])
    assert _metrics(run_dir) == _metrics(nvae_run)
    for weights in ("checkpoint-30/model.safetensors", "model/vae/diffusion_pytorch_model.safetensors"):
        ours, reference = load_file(run_dir / weights), load_file(nvae_run / weights)
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[name], reference[name]) for name in ours), weights


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(nvae_run, tmp_path, monkeypatch):
    """SIGTERM during step 7 (as the app's stop button sends it): the run saves checkpoint-7 and returns without
    exporting; resuming finishes with the uninterrupted run's losses and weights."""
    run_dir = tmp_path / "run"
    arguments = [*TINY, *NVAE, "--steps", "30", "--checkpoint-every", "15", "--output-dir", str(run_dir)]
    calls, original = [], train.vae.vae_loss

    def signalling_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(train.vae, "vae_loss", signalling_loss)
    train_vae(arguments)
    assert (run_dir / "checkpoint-7" / "COMPLETE").is_file() and not (run_dir / "model").exists()
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 8))
    monkeypatch.undo()
    train_vae([*arguments, "--resume", "latest"])
    assert _metrics(run_dir) == _metrics(nvae_run)
    ours, reference = (load_file(d / "model/vae/diffusion_pytorch_model.safetensors") for d in (run_dir, nvae_run))
    assert all(torch.equal(ours[name], reference[name]) for name in reference)


def test_conv_vae_trains_a_few_steps(tmp_path):
    train_vae([*TINY, "--model", "conv", "--latent-dim", "4", "--base-channels", "8", "--steps", "40",
               "--checkpoint-every", "40", "--kl-warmup", "0", "--output-dir", str(tmp_path / "run")])
    logged = _metrics(tmp_path / "run")
    first = sum(m["elbo_bpd"] for m in logged[:3]) / 3
    last = sum(m["elbo_bpd"] for m in logged[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert all(m["kl_weight"] == 1.0 for m in logged)


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        train_vae([*TINY, "--steps", "2", "--kl-min", "2", "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        train_vae([*TINY, "--steps", "2", "--model", "flow", "--output-dir", str(tmp_path / "x")])
