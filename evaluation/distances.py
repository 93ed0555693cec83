"""Distances between sample sets that see both where the modes are and how wide they are.

``sliced_wasserstein``: the W2 distance averaged over random 1-D projections (Rabin et al. 2011), where W2
is exact by sorting; it sees mode placement and spread but is blunt to per-mode weights in high dimension,
so ``mode_weight_error`` adds the total-variation distance between the modes' empirical and true weights.
"""

from __future__ import annotations

import torch


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
