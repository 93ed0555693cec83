"""``evaluation.metrics`` and ``evaluation.distances``: the feature distances against closed forms on Gaussians, and
the one entry point on real digits."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from data import load_dataset
from evaluation.distances import frechet_distance, kernel_distance
from evaluation.judge import feature_fid, judge_accuracy, load_judge
from evaluation.metrics import DEFAULT_METRICS, compute_metrics, precision_recall

from .conftest import seeded

pytestmark = pytest.mark.usefixtures("single_thread")

SHIPPED_JUDGE = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist-judge"


@pytest.fixture(scope="module")
def judge():
    return load_judge(SHIPPED_JUDGE)


@pytest.fixture(scope="module")
def halves():
    """The 500 held-out digits as two halves of 250, 25 of each digit in each: (images, labels) twice."""
    images, labels = load_dataset("mnist", image_size=32, split="heldout").tensors()
    by_label = labels.argsort(stable=True)
    return (images[by_label[0::2]], labels[by_label[0::2]]), (images[by_label[1::2]], labels[by_label[1::2]])


def gaussian(n, mean, variances, rotation, seed):
    """n draws of N(Q μ, Q diag(variances) Qᵀ) in float64."""
    z = torch.randn(n, len(mean), generator=seeded(seed), dtype=torch.float64)
    return (mean + z * variances.sqrt()) @ rotation.T


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    """Σ1 = Q diag(a) Qᵀ and Σ2 = Q diag(b) Qᵀ commute, so d² = ‖μ1 − μ2‖² + Σ (√a − √b)² (Dowson & Landau 1982).

    The estimate's leading fluctuation is the mean term's 2 (μ1 − μ2)ᵀ(δμ1 − δμ2), of standard deviation
    sqrt(4 Δμᵀ(Σ1 + Σ2)Δμ / n) = 0.063 here (measured 0.051 over 20 seeds); the covariance terms' bias is
    O(d/n) ≈ 2e-4. The tolerance is 4 of those standard deviations.
    """
    d, n = 4, 20_000
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=seeded(0), dtype=torch.float64))
    mean_1, mean_2 = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    var_1, var_2 = (torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64),
                    torch.tensor([2.0, 0.5, 0.5, 1.0], dtype=torch.float64))
    truth = ((mean_1 - mean_2) ** 2).sum() + ((var_1.sqrt() - var_2.sqrt()) ** 2).sum()
    standard_error = math.sqrt(4 * ((mean_1 - mean_2) ** 2 * (var_1 + var_2)).sum() / n)
    estimate = frechet_distance(gaussian(n, mean_1, var_1, rotation, 1), gaussian(n, mean_2, var_2, rotation, 2))
    assert estimate == pytest.approx(truth.item(), abs=4 * standard_error)
    # the matrix square root is not the elementwise one: rotating both sets leaves the distance unchanged
    identity = torch.eye(d, dtype=torch.float64)
    unrotated = frechet_distance(gaussian(n, mean_1, var_1, identity, 1), gaussian(n, mean_2, var_2, identity, 2))
    assert unrotated == pytest.approx(estimate, abs=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
    x = torch.randn(500, 8, generator=seeded(3), dtype=torch.float64)
    y = torch.randn(500, 8, generator=seeded(4), dtype=torch.float64) + 0.3
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    """Two samples of N(0, I₁₆): the unbiased MMD² averages to ~0 (measured 0.001 ± 0.002 over subsets); shifting
    one by 0.5 per coordinate gives ~1 (measured 1.04)."""
    x = torch.randn(500, 16, generator=seeded(5), dtype=torch.float64)
    y = torch.randn(500, 16, generator=seeded(6), dtype=torch.float64)
    same, same_std = kernel_distance(x, y, subsets=20, subset_size=250)
    shifted, _ = kernel_distance(x, y + 0.5, subsets=20, subset_size=250)
    assert abs(same) <= 0.02 and same_std > 0
    assert shifted >= 0.5


def test_kid_with_a_linear_kernel_is_the_squared_mean_distance_over_d():
    """degree 1: E[MMD²_u] = ‖μx − μy‖²/d exactly (= 0.25 here); the estimate over the 2000-sample sets has standard
    deviation sqrt(4 Δμᵀ(Σx + Σy)Δμ / (n d²)) = 0.008, and the tolerance is 4 of those."""
    x = torch.randn(2000, 16, generator=seeded(7), dtype=torch.float64)
    y = torch.randn(2000, 16, generator=seeded(8), dtype=torch.float64) + 0.5
    mean, _ = kernel_distance(x, y, subsets=5, degree=1)
    assert mean == pytest.approx(0.25, abs=0.032)


def test_kid_subsets_are_seeded():
    x = torch.randn(300, 4, generator=seeded(9), dtype=torch.float64)
    y = torch.randn(300, 4, generator=seeded(10), dtype=torch.float64)
    assert kernel_distance(x, y, subsets=5, subset_size=100, seed=1) == kernel_distance(x, y, subsets=5,
                                                                                         subset_size=100, seed=1)


def test_precision_recall_on_synthetic_manifolds():
    """Measured in 2-D, k = 3, 1000 points: one distribution 0.97–0.99 both; a dropped mode halves recall only."""
    real = torch.randn(1000, 2, generator=seeded(11))
    same = torch.randn(1000, 2, generator=seeded(12))
    scores = precision_recall(real, same)
    assert scores["precision"] >= 0.95 and scores["recall"] >= 0.95
    assert precision_recall(real, same + 50) == {"precision": 0.0, "recall": 0.0}
    two_modes = torch.cat([real[:500], real[500:] + 20])  # real data with a second mode far away
    dropped = precision_recall(two_modes, same[:500])  # a generator that only makes the first one
    assert dropped["precision"] >= 0.95
    assert 0.4 <= dropped["recall"] <= 0.55


def test_inception_metrics_name_the_missing_weights(halves):
    (images, _), (reference, _) = halves
    with pytest.raises(ValueError, match="inception_weights=PATH"):
        compute_metrics(images[:4], reference[:4], ["inception_fid"])
    with pytest.raises(ValueError, match="no file at"):
        compute_metrics(images[:4], reference[:4], ["inception_kid"], inception_weights="no/such/weights.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_metrics_name_the_missing_package(halves, tmp_path):
    (images, _), (reference, _) = halves
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({}, weights)
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
        compute_metrics(images[:4], reference[:4], ["inception_fid"], inception_weights=weights)


def test_one_call_scores_real_digits_like_the_individual_functions(judge, halves):
    """Half the held-out digits against the other half: the real-data floor, as ``bench/models.py`` reports it."""
    (images, labels), (reference, _) = halves
    results = compute_metrics(images, reference, [*DEFAULT_METRICS], labels=labels, judge=judge, kid_subsets=5)
    assert set(results) == {"samples", "reference_samples", "feature_fid", "feature_kid", "feature_kid_std",
                            "accuracy", "coverage", "entropy_bits", "max_entropy_bits", "precision", "recall"}
    assert results["samples"] == results["reference_samples"] == 250
    assert results["feature_fid"] == pytest.approx(feature_fid(judge, images, reference), rel=1e-9)
    assert results["accuracy"] == pytest.approx(judge_accuracy(judge, images, labels), abs=1e-6)
    assert results["accuracy"] >= 0.95
    assert results["coverage"] == 1.0
    assert results["entropy_bits"] == pytest.approx(math.log2(10), abs=0.01)
    assert results["precision"] >= 0.8 and results["recall"] >= 0.8


def test_noise_scores_far_worse_than_digits(judge, halves):
    """Pixel noise against the real-data floor of the same halves (measured: feature-FID 2.0, KID −0.8 ≈ 0; noise
    838 and 544)."""
    (images, _), (reference, _) = halves
    noise = torch.randn(images.shape, generator=seeded(13)).clamp(-1, 1)
    scores = compute_metrics(noise, reference, ["feature_fid", "feature_kid", "precision_recall", "coverage"],
                             judge=judge)
    floor = feature_fid(judge, images, reference)
    assert scores["feature_fid"] > 50 * floor
    assert scores["feature_kid"] > 50
    assert scores["precision"] == 0.0
    assert scores["coverage"] < 0.5


def test_bad_requests_are_errors_naming_the_problem(judge, halves):
    (images, labels), (reference, _) = halves
    with pytest.raises(ValueError, match="unknown metrics.*'fid'"):
        compute_metrics(images, reference, ["fid"], judge=judge)
    with pytest.raises(ValueError, match="accuracy needs labels"):
        compute_metrics(images, reference, ["accuracy"], judge=judge)
    with pytest.raises(ValueError, match="one label per image"):
        compute_metrics(images, reference, ["accuracy"], labels=labels[:-1], judge=judge)
    with pytest.raises(ValueError, match="bits_per_dim scores a model"):
        compute_metrics(images, reference, ["bits_per_dim"])
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\]"):
        compute_metrics((images + 1) * 127.5, reference, ["feature_fid"], judge=judge)
    with pytest.raises(ValueError, match="reference must be a float N×C×H×W"):
        compute_metrics(images, reference[:, 0], ["feature_fid"], judge=judge)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="subset_size"):
        kernel_distance(torch.randn(4, 3), torch.randn(6, 3), subset_size=5)
