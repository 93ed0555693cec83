"""Distances between sample sets.

On the exact Gaussian mixtures, distances that see both where the modes are and how wide they are:
``sliced_wasserstein``: the W2 distance averaged over random 1-D projections (Rabin et al. 2011), where W2
is exact by sorting; it sees mode placement and spread but is blunt to per-mode weights in high dimension,
so ``mode_weight_error`` adds the total-variation distance between the modes' empirical and true weights.

``frechet_distance`` and ``kernel_distance`` compare two sets of feature vectors (the judge's, Inception's) as FID
(Heusel et al. 2017) and KID (Bińkowski et al. 2018) do, through torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` with the features handed in directly, so every feature space shares one
implementation. ``evaluation.judge`` and ``evaluation.metrics`` both import them from here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

KID_SUBSETS = 100  # Bińkowski et al. 2018 and torch-fidelity: 100 subsets of (at most) 1000 samples
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced W2 between two sample sets (N, ...) and (M, ...); unequal sizes compare matched quantiles."""
    a = a.reshape(len(a), -1).double()
    b = b.reshape(len(b), -1).double()
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    pa, pb = (a @ directions).sort(0).values, (b @ directions).sort(0).values
    if len(pa) != len(pb):
        q = torch.linspace(0, 1, max(len(pa), len(pb)), dtype=torch.float64)
        pa, pb = (torch.quantile(p, q, dim=0) for p in (pa, pb))
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_weight_error(mixture, samples: torch.Tensor, class_labels=None) -> float:
    """Total variation between the histogram of samples' nearest components and the true weights.

    With ``class_labels`` (one label for the whole set), the reference is the weights within that class.
    """
    comp = mixture.component_of(samples)
    counts = torch.bincount(comp, minlength=len(mixture.weights)).double()
    target = mixture._log_weights(class_labels, 1)[0].exp()
    return float(0.5 * (counts / counts.sum() - target).abs().sum())


def nll_gap(mixture, samples: torch.Tensor, reference: torch.Tensor, class_labels=None) -> float:
    """Mean −log p(samples) minus mean −log p(reference), in nats, under the true density.

    Positive: samples sit in lower-density places than true samples (too spread, or between modes);
    negative: too concentrated (over-smoothed samplers collapse modes toward their centres).
    """
    nll = -mixture.log_prob(samples, 0.0, class_labels).mean()
    return float(nll + mixture.log_prob(reference, 0.0, class_labels).mean())


class _GivenFeatures(nn.Module):
    """An identity "feature extractor": torchmetrics' FID and KID then take feature vectors directly."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # FID reads the size from here instead of probing with an image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_feature_pair(features_a: torch.Tensor, features_b: torch.Tensor, minimum: int) -> None:
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) < minimum:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{name} must be an N×D tensor with N ≥ {minimum}, got {shape}")
        if not torch.isfinite(features).all():
            raise ValueError(f"{name} holds non-finite values")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sizes differ: {features_a.shape[1]} vs {features_b.shape[1]}")


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussians fitted to two sets of N×D features
    (Heusel et al. 2017; Dowson & Landau 1982), in float64 through torchmetrics' ``FrechetInceptionDistance``."""
    _check_feature_pair(features_a, features_b, minimum=2)
    metric = FrechetInceptionDistance(feature=_GivenFeatures(features_a.shape[1]))
    metric.update(features_a.double(), real=True)
    metric.update(features_b.double(), real=False)
    # a squared norm; eigenvalue rounding can leave it a hair below zero for identical sets
    return max(metric.compute().item(), 0.0)


def kernel_distance(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = KID_SUBSETS,
                    subset_size: int | None = None, degree: int = KID_DEGREE, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, eq. 4): the unbiased MMD² with kernel k(x, y) = (xᵀy/D + 1)^degree, as (mean,
    standard deviation) over ``subsets`` random subsets of ``subset_size`` vectors from each set (default:
    min(1000, N_a, N_b)), through torchmetrics' ``KernelInceptionDistance``; the subsets are drawn from ``seed``.
    When the subsets are the whole sets there is one estimate, and its standard deviation is 0."""
    _check_feature_pair(features_a, features_b, minimum=2)
    largest = min(len(features_a), len(features_b))
    subset_size = min(KID_SUBSET_SIZE, largest) if subset_size is None else subset_size
    if not 2 <= subset_size <= largest:
        raise ValueError(f"subset_size must be in [2, {largest}] (the smaller set's size), got {subset_size}")
    if subsets < 1 or degree < 1:
        raise ValueError(f"subsets and degree must be at least 1, got {subsets} and {degree}")
    if subset_size >= max(len(features_a), len(features_b)):  # every subset is both whole sets: one estimate
        subsets = 1
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_GivenFeatures(features_a.shape[1]), subsets=subsets,
                                         subset_size=subset_size, degree=degree)
    metric.update(features_a.double(), real=True)
    metric.update(features_b.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return mean.item(), std.item()
