"""The exact-score kit is itself exact: density, score, posterior mean, class posterior, model outputs."""

import math

import pytest
import torch

from evaluation.exact import ExactScoreModel, GaussianMixture
from schedulers.process import PREDICTION_TYPES, to_x0_and_epsilon

from .conftest import seeded

pytestmark = pytest.mark.usefixtures("single_thread")

def test_score_is_the_gradient_of_the_log_density(class_mixture):
    x = class_mixture.sample(16, seeded(0)) + 0.3 * torch.randn(16, 1, 4, 4, generator=seeded(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3] * 4)  # 3 is the null label: the whole mixture
    for sigma, lab in [(0.3, None), (0.05, labels), (4.0, labels)]:
        x_req = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(class_mixture.log_prob(x_req, sigma, lab).sum(), x_req)
        assert torch.allclose(grad, class_mixture.score(x, sigma, lab), atol=1e-10)


def test_one_dimensional_density_integrates_to_one():
    m = GaussianMixture(torch.tensor([[-1.0], [0.5]]), torch.tensor([1.0, 3.0]), torch.zeros(2, 1, 0),
                        torch.zeros(2, 0), torch.tensor([0.04, 0.01]))
    grid = torch.linspace(-15, 15, 60001, dtype=torch.float64)[:, None]
    for sigma in [0.0, 0.2, 2.0]:
        density = m.log_prob(grid, sigma).exp()
        assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)


def test_samples_have_the_mixture_moments(mixture):
    x = mixture.sample(200_000, seeded(0)).reshape(200_000, -1)
    w = mixture.weights
    mean = (w[:, None] * mixture.means).sum(0)
    cov = sum(w[k] * (mixture.basis[k] @ torch.diag(mixture.spectrum[k]) @ mixture.basis[k].T
                      + mixture.iso_var[k] * torch.eye(mixture.dim)
                      + torch.outer(mixture.means[k] - mean, mixture.means[k] - mean)) for k in range(len(w)))
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.01)


def test_posterior_mean_is_bayes_optimal(mixture):
    """E[x0 | x] minimizes E‖x0 − D(x)‖²: the exact denoiser beats any perturbation of it."""
    x0 = mixture.sample(20_000, seeded(0))
    for sigma in [0.05, 0.5, 3.0]:
        x = x0 + sigma * torch.randn(x0.shape, generator=seeded(1), dtype=torch.float64)
        best = mixture.denoise(x, sigma)
        mse = ((best - x0) ** 2).mean()
        for worse in [1.05 * best, best + 0.02, 0.5 * (best + x)]:
            assert mse < ((worse - x0) ** 2).mean()


def test_class_posterior_is_bayes_rule(class_mixture):
    x = class_mixture.sample(32, seeded(0)) + 0.5 * torch.randn(32, 1, 4, 4, generator=seeded(1), dtype=torch.float64)
    log_post = class_mixture.class_log_posterior(x, 0.5)
    class_weight = torch.stack([class_mixture.weights[class_mixture.classes == c].sum() for c in range(3)])
    by_bayes = torch.stack([class_mixture.log_prob(x, 0.5, torch.full((32,), c)) for c in range(3)], 1)
    by_bayes = by_bayes + class_weight.log() - class_mixture.log_prob(x, 0.5)[:, None]
    assert torch.allclose(log_post, by_bayes, atol=1e-9)
    assert torch.allclose(log_post.exp().sum(1), torch.ones(32, dtype=torch.float64))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_model_outputs_decode_to_the_same_x0(class_mixture, prediction_type):
    reference = ExactScoreModel.from_mixture(class_mixture, "epsilon")
    model = ExactScoreModel.from_mixture(class_mixture, prediction_type)
    x, labels = torch.randn(8, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3] * 2)
    for t in [0, 17.5, 500, 999]:
        alpha, beta = model.schedule.coefficients(torch.tensor(float(t)))
        x0, eps = to_x0_and_epsilon(prediction_type, model(x, t, labels).sample, x, alpha, beta)
        assert torch.allclose(eps, reference(x, t, labels).sample, atol=1e-9)
        sigma = beta / alpha
        assert torch.allclose(x0, class_mixture.denoise(x / alpha, sigma, labels), atol=1e-9)


def test_exact_model_saves_and_loads_with_safetensors(tmp_path, class_mixture):
    model = ExactScoreModel.from_mixture(class_mixture, "v_prediction", beta_schedule="squaredcos_cap_v2")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = ExactScoreModel.from_pretrained(tmp_path)
    x = torch.randn(4, 1, 4, 4)
    assert torch.equal(loaded(x, 300, [0, 1, 2, 3]).sample, model(x, 300, [0, 1, 2, 3]).sample)
    assert loaded.num_classes == 3 and loaded.config.num_class_embeds == 4


def test_fit_recovers_a_gaussian_per_class():
    truth = GaussianMixture.random((1, 3, 3), 2, rank=1, num_classes=2, mode_var=0.5, iso_var=0.01, seed=4)
    labels = torch.arange(2).repeat(20_000)
    images = torch.cat([truth.sample(1, seeded(i), class_labels=int(c)) for i, c in enumerate(labels[:4000])])
    fitted = GaussianMixture.fit(images, labels[:4000], rank=1)
    assert torch.allclose(fitted.means, truth.means, atol=0.05)
    assert torch.allclose(fitted.iso_var, truth.iso_var, rtol=0.1)
    assert math.isclose(float(fitted.weights[0]), 0.5, abs_tol=1e-9)
